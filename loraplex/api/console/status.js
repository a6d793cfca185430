// Server status (the operator view): read every POLL_MS from the same sources as monitoring —
// `/metrics` (Prometheus text; open unless the server has a metrics token) and `/admin/adapters`
// (the residency snapshot; only with the server's admin token). The operator's tokens are kept
// in this tab's sessionStorage, apart from the account's token, which is never sent to either.

import { getOperator, listAll, request, setOperator } from "./api.js";
import { formatBytes, formatSeconds, h, showError } from "./dom.js";

const POLL_MS = 2000;

/** Prometheus text format → Map(name → [{labels, value}]). */
export function parseMetrics(text) {
  const series = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[key] = value;
    if (!series.has(match[1])) series.set(match[1], []);
    series.get(match[1]).push({ labels, value: Number(match[3]) });
  }
  return series;
}

function value(series, name, labels = {}) {
  const found = (series.get(name) || []).find((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  return found ? found.value : null;
}

/** The q-quantile of a Prometheus histogram from its cumulative buckets (upper bound of the bucket). */
function quantile(series, name, q) {
  const buckets = (series.get(`${name}_bucket`) || []).map((b) => [Number(b.labels.le), b.value]).sort((a, b) => a[0] - b[0]);
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!total) return null;
  const bucket = buckets.find(([, count]) => count >= q * total);
  return bucket && Number.isFinite(bucket[0]) ? bucket[0] : null;
}

export function render(main, session) {
  const operator = getOperator();
  const adminToken = h("input", { id: "admin-token", type: "password", autocomplete: "off", value: operator.adminToken || "" });
  const metricsToken = h("input", { id: "metrics-token", type: "password", autocomplete: "off", value: operator.metricsToken || "" });
  const tokens = h("form", { id: "operator-form", class: "card", onsubmit: (event) => {
    event.preventDefault();
    setOperator({ adminToken: adminToken.value.trim(), metricsToken: metricsToken.value.trim() });
    poll();
  } },
    h("h2", {}, "Operator tokens"),
    h("p", { class: "muted small" }, "Slots and the adapters holding them come from /admin/adapters, which needs the server's admin token ",
      "(LORAPLEX_ADMIN_TOKEN). /metrics needs the metrics token only when the server was started with --metrics-token. ",
      "Both stay in this tab; your account's API token is never sent to these routes."),
    h("div", { class: "grid2" },
      h("div", {}, h("label", { for: "admin-token" }, "Admin token"), adminToken),
      h("div", {}, h("label", { for: "metrics-token" }, "Metrics token (if the server has one)"), metricsToken)),
    h("button", { type: "submit", id: "operator-apply" }, "Use these tokens"));
  const metricsError = h("p", { id: "metrics-error", class: "error", role: "alert", hidden: true });
  const adminError = h("p", { id: "admin-error", class: "error", role: "alert", hidden: true });
  const tiles = h("div", { id: "tiles", class: "tiles" });
  const slots = h("tbody", { id: "slot-rows" });
  const tiers = h("div", { id: "tiers" });
  const updated = h("p", { id: "status-updated", class: "muted small" }, "\u00a0");
  main.append(h("h1", {}, "Server status"), updated, metricsError, tiles,
    h("section", { class: "card" }, h("h2", {}, "Device slots"), adminError,
      h("div", { class: "table-wrap" }, h("table", { id: "slots-table" },
        h("thead", {}, h("tr", {}, ["Slot", "Adapter (finetune)", "State", "Requests holding it"].map((t) => h("th", { scope: "col" }, t)))), slots)),
      tiers),
    tokens);

  let names = new Map();  // finetune id → name, for this account's own finetunes
  listAll(session, "/finetunes").then((own) => { names = new Map(own.map((f) => [f.id, f.name])); }).catch(() => {});
  const label = (adapter) => (names.has(adapter) ? `${names.get(adapter)} (${adapter})` : adapter);
  let previous = null;  // {at, tokens, ttftSum, ttftCount} of the previous scrape
  let timer = null;
  let stopped = false;
  let round = 0;  // the latest poll: an older one still in flight (tokens changed meanwhile) shows nothing

  async function poll() {
    clearTimeout(timer);
    const mine = ++round;
    const isLatest = () => mine === round && !stopped;
    const op = getOperator();
    await Promise.all([readMetrics(op, isLatest), readAdmin(op, isLatest)]);
    if (!isLatest()) return;
    updated.textContent = `Updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`;
    timer = setTimeout(poll, POLL_MS);
  }

  async function readMetrics(op, isLatest) {
    let series;
    try {
      const response = await request("/metrics", { token: op.metricsToken || undefined });
      series = parseMetrics(await response.text());
      if (!isLatest()) return;
      showError(metricsError, "");
    } catch (e) {
      if (!isLatest()) return;
      showError(metricsError, `Metrics unavailable: ${e.message || e}` + (e.status === 401 ? " — enter the server's metrics token below." : ""));
      return;
    }
    const now = performance.now() / 1000;
    const current = { at: now, tokens: value(series, "loraplex_generation_tokens_total") || 0,
      ttftSum: value(series, "loraplex_time_to_first_token_seconds_sum") || 0,
      ttftCount: value(series, "loraplex_time_to_first_token_seconds_count") || 0 };
    let rate = null, recentTtft = null;
    if (previous) {
      rate = (current.tokens - previous.tokens) / Math.max(current.at - previous.at, 1e-3);
      const n = current.ttftCount - previous.ttftCount;
      recentTtft = n > 0 ? (current.ttftSum - previous.ttftSum) / n : null;
    }
    previous = current;
    const tile = (id, label, main_, detail) => h("div", { class: "tile", id }, h("div", { class: "label" }, label),
      h("div", { class: "value" }, main_), h("div", { class: "muted small" }, detail));
    const slotsTotal = value(series, "loraplex_lora_slots_total"), slotsUsed = value(series, "loraplex_lora_slots_occupied");
    tiles.replaceChildren(
      tile("tile-queue", "Queue depth", String(value(series, "loraplex_requests_waiting") ?? "—"),
        `${value(series, "loraplex_requests_running") ?? "—"} running · ${value(series, "loraplex_requests_in_flight") ?? "—"} in flight`),
      tile("tile-throughput", "Tokens/s", rate === null ? "…" : rate.toFixed(1), `${current.tokens} tokens generated in all`),
      tile("tile-ttft", "Time to first token", formatSeconds(current.ttftCount ? current.ttftSum / current.ttftCount : null),
        `mean of ${current.ttftCount} · p50 ≤ ${formatSeconds(quantile(series, "loraplex_time_to_first_token_seconds", 0.5))}` +
        ` · p95 ≤ ${formatSeconds(quantile(series, "loraplex_time_to_first_token_seconds", 0.95))}` +
        (recentTtft === null ? "" : ` · last ${POLL_MS / 1000} s: ${formatSeconds(recentTtft)}`)),
      tile("tile-slots", "LoRA slots", `${slotsUsed ?? "—"} / ${slotsTotal ?? "—"}`, "occupied or loading / total"),
      tile("tile-kv", "KV-cache blocks", `${value(series, "loraplex_kv_blocks_used") ?? "—"} / ${value(series, "loraplex_kv_blocks_total") ?? "—"}`, "used / total"),
      tile("tile-host", "Host cache", formatBytes(value(series, "loraplex_adapter_cache_bytes", { tier: "host" })),
        `${value(series, "loraplex_adapter_cache_hits_total", { tier: "host" }) ?? 0} hits · ${value(series, "loraplex_adapter_cache_misses_total", { tier: "host" }) ?? 0} misses`),
      tile("tile-disk", "Disk cache", formatBytes(value(series, "loraplex_adapter_cache_bytes", { tier: "disk" })),
        `${value(series, "loraplex_adapter_cache_hits_total", { tier: "disk" }) ?? 0} hits · ${value(series, "loraplex_adapter_cache_misses_total", { tier: "disk" }) ?? 0} misses`));
  }

  async function readAdmin(op, isLatest) {
    if (!op.adminToken) {
      showError(adminError, "Enter the server's admin token below to see which adapters hold the slots.");
      slots.replaceChildren();
      tiers.replaceChildren();
      return;
    }
    let snapshot;
    try {
      snapshot = await (await request("/admin/adapters", { token: op.adminToken })).json();
      if (!isLatest()) return;
      showError(adminError, "");
    } catch (e) {
      if (!isLatest()) return;
      const hint = e.status === 404 ? " (this server has no operator routes: start it with LORAPLEX_ADMIN_TOKEN)" : "";
      showError(adminError, `Slots unavailable: ${e.message || e}${hint}`);
      return;
    }
    const residents = new Map(snapshot.slots.residents.map((r) => [r.slot, r]));
    const rows = [];
    for (let slot = 0; slot < snapshot.slots.total; slot += 1) {
      const r = residents.get(slot);
      rows.push(h("tr", { "data-slot": slot }, h("td", { class: "num" }, String(slot)),
        h("td", { class: "mono" }, r ? label(r.adapter) : h("span", { class: "muted" }, "free")),
        h("td", {}, r ? (r.loading ? "loading" : "resident") : "—"), h("td", { class: "num" }, r ? String(r.holders) : "—")));
    }
    slots.replaceChildren(...rows);
    const tier = (title, t) => h("p", {}, h("strong", {}, title), ` ${formatBytes(t.bytes)} of ${formatBytes(t.budget_bytes)}: `,
      t.adapters.length ? t.adapters.map((a) => label(a.adapter)).join(", ") : h("span", { class: "muted" }, "none"));
    tiers.replaceChildren(tier("Host memory", snapshot.host), tier("Local disk", snapshot.disk),
      h("p", { class: "small muted" }, `Loading: ${snapshot.loading.map((l) => `${l.adapter} (${l.state})`).join(", ") || "none"} · ` +
        `waiting for room: ${snapshot.waiting_for_room.join(", ") || "none"} · errored: ${snapshot.errored.join(", ") || "none"}`));
  }

  poll();
  return () => { stopped = true; clearTimeout(timer); };
}
