// Playground: one prompt, two columns (base vs finetune, or finetune vs finetune), each streamed
// from POST …/ai/run with the same sampling settings; token counts and latency per answer; the
// request of each column copyable as curl / Python (Cloudflare SDK) / Python (OpenAI SDK).
// Answers stream into fixed-size panes, so the page never jumps while text arrives.
// `#/playground?finetune=NAME` puts that finetune on the right side (the base model is on the left).

import { ApiFailure, listAll, streamRun } from "./api.js";
import { formatSeconds, h, showError } from "./dom.js";
import * as snippets from "./snippets.js";

const BASE = "";  // the picker's value for the base model

export function render(main, session) {
  const controllers = new Set();
  const error = h("p", { id: "playground-error", class: "error", role: "alert", hidden: true });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Ask both sides the same thing… (Ctrl+Enter sends)" });
  const raw = h("input", { id: "raw", type: "checkbox" });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 5, step: 0.1, value: 0.6 });
  const topP = h("input", { id: "top-p", type: "number", min: 0.01, max: 1, step: 0.01, value: 1 });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, step: 1, value: 256 });
  const seed = h("input", { id: "seed", type: "number", min: 0, step: 1, placeholder: "random" });
  const send = h("button", { id: "send", type: "submit" }, "Send to both");
  const stop = h("button", { id: "stop", type: "button", disabled: true, onclick: () => controllers.forEach((c) => c.abort()) }, "Stop");
  const clear = h("button", { id: "clear", type: "button", onclick: () => columns.forEach((c) => c.clear()) }, "Clear");
  const snippetDialog = snippetView();
  const columns = [column("left", session, snippetDialog), column("right", session, snippetDialog)];

  const settings = () => {
    const body = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    if (topP.value !== "" && Number(topP.value) !== 1) body.top_p = Number(topP.value);
    if (seed.value !== "") body.seed = Number(seed.value);
    return body;
  };
  for (const c of columns) c.settings = () => ({ prompt: prompt.value, raw: raw.checked, sampling: settings() });

  const form = h("form", { id: "playground-form", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    showError(error, "");
    const text = prompt.value;
    if (!text.trim()) { showError(error, "Write a prompt first."); prompt.focus(); return; }
    send.disabled = true; stop.disabled = false;
    if (!raw.checked) prompt.value = "";  // chat: the next turn starts empty; raw: keep the text to tweak
    try {
      await Promise.all(columns.map((c) => c.ask(text, raw.checked, settings(), controllers)));
    } finally {
      send.disabled = false; stop.disabled = true;
    }
  } },
    h("label", { for: "prompt" }, "Prompt"), prompt,
    h("div", { class: "row wrap" },
      h("label", { class: "inline" }, "Temperature ", temperature), h("label", { class: "inline" }, "top_p ", topP),
      h("label", { class: "inline" }, "Max tokens ", maxTokens), h("label", { class: "inline" }, "Seed ", seed),
      h("label", { class: "inline check" }, raw, " Raw (no chat template, no history)")),
    h("div", { class: "row" }, send, stop, clear), error);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); form.requestSubmit(); }
  });
  main.append(h("h1", {}, "Playground"), form, h("div", { class: "columns" }, columns.map((c) => c.element)), snippetDialog.element);

  listAll(session, "/finetunes").then((finetunes) => {
    const ready = finetunes.filter((f) => f.state === "ready");
    const asked = new URLSearchParams(location.hash.split("?")[1] || "").get("finetune");  // #/playground?finetune=NAME
    const right = ready.some((f) => f.name === asked) ? asked : (ready[0] ? ready[0].name : BASE);
    columns.forEach((c, i) => c.setChoices(ready, i === 0 ? BASE : right));
  }).catch((e) => showError(error, `Could not list your finetunes: ${e.message || e}`));
  return () => controllers.forEach((c) => c.abort());
}

function column(side, session, snippetDialog) {
  let history = [];  // chat turns of this column: {role, content}
  let lastRequest = null;  // the request of the latest answer: what "Copy as" gives
  const picker = h("select", { id: `${side}-model`, "aria-label": `${side} model` }, h("option", { value: BASE }, "Base model"));
  const output = h("div", { id: `${side}-output`, class: "transcript", tabindex: 0, "aria-live": "polite", "aria-label": `${side} answers` });
  const stats = h("p", { id: `${side}-stats`, class: "stats muted" }, "\u00a0");
  const copy = (kind, label) => h("button", { type: "button", class: "small", id: `${side}-copy-${kind}`,
    onclick: () => snippetDialog.show(label, snippets[kind](location.origin, session, self.request())) }, label);
  const self = {
    element: h("section", { class: "card column", "aria-label": `${side} side` },
      h("div", { class: "row" }, h("label", { for: `${side}-model` }, side === "left" ? "Left" : "Right"), picker),
      output, stats,
      h("div", { class: "row wrap" }, h("span", { class: "muted small" }, "Copy as"), copy("curl", "curl"),
        copy("cloudflarePython", "Python (Cloudflare SDK)"), copy("openaiPython", "Python (OpenAI SDK)"))),
    setChoices(finetunes, selected) {
      picker.replaceChildren(h("option", { value: BASE }, "Base model"),
        ...finetunes.map((f) => h("option", { value: f.name }, `${f.name}${f.public ? " (public)" : ""}`)));
      picker.value = selected;
    },
    clear() { history = []; lastRequest = null; output.replaceChildren(); stats.textContent = "\u00a0"; },
    /** The request of this column's latest answer; before any, the one the form would send now. */
    request() {
      if (lastRequest) return lastRequest;
      const { prompt, raw, sampling } = self.settings();
      return build(prompt || "Hello", raw, sampling);
    },
    async ask(text, raw, sampling, controllers) {
      const request = build(text, raw, sampling);
      lastRequest = request;
      output.append(h("div", { class: "turn user" }, h("span", { class: "who" }, raw ? "prompt" : "you"), text));
      const answer = h("div", { class: "answer", "data-done": "false" });
      const turn = h("div", { class: "turn assistant" }, h("span", { class: "who" }, modelLabel()), answer);
      output.append(turn);
      output.scrollTop = output.scrollHeight;
      stats.textContent = "waiting for the first token…";
      const controller = new AbortController();
      controllers.add(controller);
      const started = performance.now();
      let firstAt = null;
      let text_ = "";
      try {
        const usage = await streamRun(session, session.model, runBody(request), (delta) => {
          if (firstAt === null) firstAt = performance.now();
          text_ += delta;
          const stick = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
          answer.textContent = text_;
          if (stick) output.scrollTop = output.scrollHeight;
        }, controller.signal);
        const total = (performance.now() - started) / 1000;
        const ttft = firstAt === null ? null : (firstAt - started) / 1000;
        const tokens = usage ? usage.completion_tokens : null;
        stats.textContent = `${usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens · ` : ""}` +
          `first token ${formatSeconds(ttft)} · total ${formatSeconds(total)}` +
          (tokens && total > 0 ? ` · ${(tokens / total).toFixed(1)} tokens/s` : "");
        answer.dataset.promptTokens = usage ? usage.prompt_tokens : "";
        answer.dataset.completionTokens = usage ? usage.completion_tokens : "";
        if (!raw) history.push({ role: "user", content: text }, { role: "assistant", content: text_ });
      } catch (e) {
        const stopped = e.name === "AbortError";
        answer.append(h("div", { class: stopped ? "muted" : "error", role: stopped ? null : "alert" },
          stopped ? "(stopped)" : `Error: ${e instanceof ApiFailure ? e.message : e}`));
        stats.textContent = stopped ? "stopped" : "failed";
      } finally {
        answer.dataset.done = "true";
        controllers.delete(controller);
      }
    },
  };
  function modelLabel() { return picker.value === BASE ? "base model" : picker.value; }
  function build(text, raw, sampling) {
    const body = raw ? { prompt: text, raw: true, ...sampling } : { messages: [...history, { role: "user", content: text }], ...sampling };
    return { model: session.model, lora: picker.value === BASE ? null : picker.value, body };
  }
  function runBody(request) { return request.lora ? { ...request.body, lora: request.lora } : request.body; }
  return self;
}

function snippetView() {
  const title = h("h2", { id: "snippet-title" });
  const code = h("pre", { id: "snippet-code", tabindex: 0 });
  const note = h("p", { id: "snippet-note", class: "muted small", role: "status" });
  const close = h("button", { type: "button", id: "snippet-close" }, "Close");
  const element = h("dialog", { id: "snippet-dialog", "aria-labelledby": "snippet-title" }, title, code, note,
    h("p", { class: "muted small" }, "Set CLOUDFLARE_API_TOKEN to your API token first."), h("div", { class: "row end" }, close));
  close.addEventListener("click", () => element.close());
  return {
    element,
    async show(label, text) {
      title.textContent = `Copy as ${label}`;
      code.textContent = text;
      note.textContent = "";
      element.showModal();
      close.focus();
      try {
        await navigator.clipboard.writeText(text);
        note.textContent = "Copied to the clipboard.";
      } catch {
        note.textContent = "Select the text above and copy it (the browser did not allow clipboard access).";
      }
    },
  };
}
