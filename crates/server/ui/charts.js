// Small SVG charts (no library): bars for a value per label, lines for series of (x, y).
// Colours come from app.css classes.

import { h } from "./vendor/preact.mjs";
import htm from "./vendor/htm.mjs";

const html = htm.bind(h);
const W = 640;
const H = 200;
const PAD = { l: 76, r: 12, t: 12, b: 28 };

function ticks(max) {
  return [0, 0.25, 0.5, 0.75, 1].map((f) => f * max);
}

/** `data`: [{ label, value }]; `format`: the axis and tooltip text of a value. */
export function BarChart({ data, format = String, title }) {
  if (!data.length) return html`<p class="muted">No data yet.</p>`;
  const max = Math.max(...data.map((d) => d.value), 1e-12);
  const iw = W - PAD.l - PAD.r;
  const ih = H - PAD.t - PAD.b;
  const bw = Math.min(iw / data.length, 80);
  return html`<figure class="chart">
    <figcaption>${title}</figcaption>
    <svg viewBox="0 0 ${W} ${H}" role="img" aria-label=${title}>
      ${ticks(max).map(
        (t) => html`<g><line class="grid" x1=${PAD.l} x2=${W - PAD.r} y1=${PAD.t + ih - (t / max) * ih} y2=${PAD.t + ih - (t / max) * ih} />
          <text class="axis" x=${PAD.l - 4} y=${PAD.t + ih - (t / max) * ih + 4} text-anchor="end">${format(t)}</text></g>`,
      )}
      ${data.map(
        (d, i) => html`<g>
          <rect class="bar" x=${PAD.l + i * bw + bw * 0.1} width=${bw * 0.8} y=${PAD.t + ih - (d.value / max) * ih} height=${(d.value / max) * ih}>
            <title>${d.label}: ${format(d.value)}</title>
          </rect>
          <text class="axis" x=${PAD.l + i * bw + bw / 2} y=${H - 8} text-anchor="middle">${d.label.length > 12 ? d.label.slice(0, 11) + "…" : d.label}</text>
        </g>`,
      )}
    </svg>
  </figure>`;
}

/** `series`: [{ name, cls, points: [[x, y]] }], x ascending. */
export function LineChart({ series, title, xLabel = "", testid }) {
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return html`<figure class="chart" data-testid=${testid} data-points="0"><figcaption>${title}</figcaption><p class="muted">No points yet.</p></figure>`;
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  const iw = W - PAD.l - PAD.r;
  const ih = H - PAD.t - PAD.b;
  const sx = (x) => PAD.l + (x1 === x0 ? iw / 2 : ((x - x0) / (x1 - x0)) * iw);
  const sy = (y) => PAD.t + ih - (y1 === y0 ? ih / 2 : ((y - y0) / (y1 - y0)) * ih);
  return html`<figure class="chart" data-testid=${testid} data-points=${pts.length}>
    <figcaption>${title} ${series.map((s) => html`<span class="legend ${s.cls}">${s.name}</span>`)}</figcaption>
    <svg viewBox="0 0 ${W} ${H}" role="img" aria-label=${title}>
      ${ticks(y1 - y0).map(
        (t) => html`<g><line class="grid" x1=${PAD.l} x2=${W - PAD.r} y1=${sy(y0 + t)} y2=${sy(y0 + t)} />
          <text class="axis" x=${PAD.l - 4} y=${sy(y0 + t) + 4} text-anchor="end">${(y0 + t).toFixed(2)}</text></g>`,
      )}
      <text class="axis" x=${W - PAD.r} y=${H - 8} text-anchor="end">${xLabel} ${x1}</text>
      <text class="axis" x=${PAD.l} y=${H - 8}>${x0}</text>
      ${series.map(
        (s) => html`<g class=${s.cls}>
          <path class="line" d=${s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")} />
          ${s.points.map((p) => html`<circle class="dot" cx=${sx(p[0])} cy=${sy(p[1])} r="3"><title>${xLabel} ${p[0]}: ${p[1].toFixed(4)}</title></circle>`)}
        </g>`,
      )}
    </svg>
  </figure>`;
}
