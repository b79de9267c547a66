/** Percentiles and the SVG chart for the benchmark. Pure. */
export interface Summary {
  n: number;
  p50: number;
  p95: number;
  min: number;
  max: number;
  mean: number;
}

export function percentile(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p / 100) * (s.length - 1);
  const lo = Math.floor(rank),
    hi = Math.ceil(rank);
  return s[lo] + (s[hi] - s[lo]) * (rank - lo);
}

export function summarise(xs: number[]): Summary {
  const round = (x: number) => Math.round(x * 10) / 10;
  return {
    n: xs.length,
    p50: round(percentile(xs, 50)),
    p95: round(percentile(xs, 95)),
    min: round(Math.min(...xs)),
    max: round(Math.max(...xs)),
    mean: round(xs.reduce((a, b) => a + b, 0) / xs.length),
  };
}

/** One row per method: each sample as a dot on a log-scaled time axis, with p50 and p95 ticks. */
export function renderSvg(samples: Record<string, number[]>): string {
  const W = 760,
    rowH = 60,
    left = 150,
    right = 30,
    top = 40;
  const all = Object.values(samples)
    .flat()
    .filter((x) => x > 0);
  const lo = 10 ** Math.floor(Math.log10(Math.min(...all))),
    hi = 10 ** Math.ceil(Math.log10(Math.max(...all)));
  const x = (v: number) => left + ((Math.log10(v) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo))) * (W - left - right);
  const rows = Object.entries(samples);
  const H = top + rows.length * rowH + 40;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${left}" y="20" font-size="14">time to ready, ms (log scale): each dot one run; bars p50, dashes p95</text>`,
  ];
  for (let d = lo; d <= hi; d *= 10) {
    parts.push(
      `<line x1="${x(d)}" x2="${x(d)}" y1="${top - 5}" y2="${H - 35}" stroke="#ddd"/>`,
      `<text x="${x(d)}" y="${H - 20}" text-anchor="middle">${d}</text>`,
    );
  }
  rows.forEach(([name, xs], i) => {
    const cy = top + i * rowH + rowH / 2;
    parts.push(`<text x="${left - 10}" y="${cy + 4}" text-anchor="end">${name}</text>`);
    xs.forEach(
      (v, k) => void parts.push(`<circle cx="${x(v).toFixed(1)}" cy="${(cy - 8 + (k % 5) * 4).toFixed(1)}" r="3" fill="#3b6ea8" fill-opacity="0.6"/>`),
    );
    const p50 = percentile(xs, 50),
      p95 = percentile(xs, 95);
    parts.push(`<line x1="${x(p50)}" x2="${x(p50)}" y1="${cy - 16}" y2="${cy + 16}" stroke="#c0392b" stroke-width="3"/>`);
    parts.push(`<line x1="${x(p95)}" x2="${x(p95)}" y1="${cy - 16}" y2="${cy + 16}" stroke="#c0392b" stroke-dasharray="3,3"/>`);
    parts.push(`<text x="${x(p50) + 5}" y="${cy - 18}" fill="#c0392b">${Math.round(p50)}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}
