import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['*.test.js'],
    // building the image and booting its template take minutes under TCG
    testTimeout: 600_000,
    hookTimeout: 600_000,
  },
});
