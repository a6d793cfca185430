// The training-loss curve of a fine-tuning job, drawn as inline SVG by this file (no chart library).
// The SVG has a fixed size (a viewBox scaled to the card's width), so points arriving never move
// anything else on the page. Each point is a <circle data-step data-loss> with a <title>.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640, HEIGHT = 240;
const PAD = { left: 56, right: 16, top: 14, bottom: 36 };

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== null) el.textContent = text;
  return el;
}

/** Up to `count` round tick values covering [low, high]. */
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** A chart: {element, update(points, totalSteps)} where points = [{step, loss}] in any order. */
export function lossChart(id) {
  const element = svg("svg", { id, class: "loss-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": "Training loss by step: no points yet", preserveAspectRatio: "xMidYMid meet" });
  const title = svg("title", {}, "Training loss by step");
  const grid = svg("g", { class: "grid" });
  const line = svg("polyline", { class: "line", points: "", fill: "none" });
  const dots = svg("g", { class: "dots" });
  const empty = svg("text", { class: "empty", x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle" }, "No loss reported yet");
  element.append(title, grid, line, dots, empty);

  function update(points, totalSteps = null) {
    const sorted = [...points].sort((a, b) => a.step - b.step);
    const maxStep = Math.max(totalSteps || 0, sorted.length ? sorted[sorted.length - 1].step : 0, 1);
    const losses = sorted.map((p) => p.loss);
    let low = losses.length ? Math.min(...losses) : 0, high = losses.length ? Math.max(...losses) : 1;
    if (high - low < 1e-6) { low -= 0.5; high += 0.5; }
    const margin = (high - low) * 0.06;  // no point on the frame
    low = Math.max(0, low - margin); high += margin;
    const yTicks = ticks(low, high, 6);
    const x = (step) => PAD.left + (step / maxStep) * (WIDTH - PAD.left - PAD.right);
    const y = (loss) => PAD.top + (1 - (loss - low) / (high - low)) * (HEIGHT - PAD.top - PAD.bottom);

    const gridParts = [svg("line", { class: "axis", x1: PAD.left, y1: HEIGHT - PAD.bottom, x2: WIDTH - PAD.right, y2: HEIGHT - PAD.bottom }),
      svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: HEIGHT - PAD.bottom }),
      svg("text", { class: "label", x: (PAD.left + WIDTH - PAD.right) / 2, y: HEIGHT - 4, "text-anchor": "middle" }, "step"),
      svg("text", { class: "label", x: 12, y: (PAD.top + HEIGHT - PAD.bottom) / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${(PAD.top + HEIGHT - PAD.bottom) / 2})` }, "training loss")];
    for (const v of yTicks) {
      gridParts.push(svg("line", { class: "tick", x1: PAD.left, y1: y(v), x2: WIDTH - PAD.right, y2: y(v) }),
        svg("text", { class: "tick-label", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
    }
    for (const s of ticks(0, maxStep, 8).filter((s) => Number.isInteger(s))) {
      gridParts.push(svg("text", { class: "tick-label", x: x(s), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, String(s)));
    }
    grid.replaceChildren(...gridParts);
    line.setAttribute("points", sorted.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" "));
    dots.replaceChildren(...sorted.map((p) => svg("circle", { cx: x(p.step).toFixed(1), cy: y(p.loss).toFixed(1), r: 3.5,
      "data-step": p.step, "data-loss": p.loss }, null)));
    for (const [dot, p] of [...dots.children].map((d, i) => [d, sorted[i]])) dot.append(svg("title", {}, `step ${p.step}: loss ${p.loss.toFixed(4)}`));
    empty.setAttribute("visibility", sorted.length ? "hidden" : "visible");
    const last = sorted[sorted.length - 1];
    element.setAttribute("aria-label", last ? `Training loss by step: ${sorted.length} points, step ${last.step} of ${maxStep} at loss ${last.loss.toFixed(4)}`
      : "Training loss by step: no points yet");
  }
  update([]);
  return { element, update };
}
