// Small DOM helpers: build elements without innerHTML (tenant data is never parsed as HTML).

/** h("button", {class: "x", onclick: f}, "text", child…) → a new element. Props: "class", "on<event>"
 *  listeners, booleans (true: attribute present, false/null: absent), anything else as an attribute. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** 1536 → "1.5 KiB". */
export function formatBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

/** "2026-11-23T18:00:00.000000Z" → "2026-11-23 18:00 UTC" (with `seconds`: "… 18:00:00 UTC"). */
export function formatTime(iso, seconds = false) {
  if (!iso) return "—";
  return `${iso.slice(0, 10)} ${iso.slice(11, seconds ? 19 : 16)} UTC`;
}

/** Unix seconds (the OpenAI dialect's created_at) → "2026-11-23 18:00 UTC". */
export function formatUnixTime(s, seconds = false) {
  if (s === null || s === undefined) return "—";
  return formatTime(new Date(s * 1000).toISOString(), seconds);
}

/** Seconds → "123 ms" / "1.23 s". */
export function formatSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "—";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

/** An alert line (role=alert, so screen readers announce it) showing `message`, or hidden when empty. */
export function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

/** A modal yes/no dialog (#confirm-dialog; Escape or Cancel answers no). `ask(message, yes)`
 *  shows it with the confirming button labelled `yes` and resolves to true only on that button. */
export function confirmDialog() {
  const text = h("p", { id: "confirm-text" });
  const cancel = h("button", { type: "button", id: "confirm-cancel", value: "cancel" }, "Cancel");
  const ok = h("button", { type: "button", id: "confirm-ok", class: "danger", value: "ok" }, "Delete");
  const element = h("dialog", { id: "confirm-dialog", "aria-labelledby": "confirm-text" }, text, h("div", { class: "row end" }, cancel, ok));
  cancel.addEventListener("click", () => element.close("cancel"));
  ok.addEventListener("click", () => element.close("ok"));
  return {
    element,
    ask(message, yes = "Delete") {
      text.textContent = message;
      ok.textContent = yes;
      element.returnValue = "";
      element.showModal();
      cancel.focus();
      return new Promise((resolve) => element.addEventListener("close", () => resolve(element.returnValue === "ok"), { once: true }));
    },
  };
}
