/** How a zod validation failure is told to a person: one line per problem, "field.path: what is wrong". */
import type { z } from 'zod';

export function describeIssues(e: z.ZodError): string {
  return e.issues
    .slice(0, 4)
    .map((i) => `${i.path.join('.') || '(top)'}: ${i.message}`)
    .join('; ');
}
