// Logs page: the account's request logs (…/ai/logs): turn logging on or off and set the retention;
// browse entries newest first with filters (finetune, time range, feedback) one page at a time;
// give feedback (+1 / −1, pressed again to clear) and correct a response in a detail dialog;
// export the filtered entries as a chat-format JSONL dataset file (…/ai/logs/export), which then
// appears on the Datasets page and can train a job. Times are shown in UTC.

import { ApiFailure, api, listAll } from "./api.js";
import { confirmDialog, formatTime, h, showError } from "./dom.js";

const PER_PAGE = 20;
const FEEDBACK_LABELS = { 1: "Good (+1)", "-1": "Bad (−1)" };

/** The text of an entry's prompt for the table: the raw prompt, else its last user turn. */
export function promptText(entry) {
  if (entry.prompt !== null && entry.prompt !== undefined) return entry.prompt;
  const users = (entry.messages || []).filter((m) => m.role === "user");
  return users.length ? users[users.length - 1].content : "";
}

/** A datetime-local value (the browser's local time) → unix seconds, or null when empty. */
function unixSeconds(value) {
  return value ? Math.floor(new Date(value).getTime() / 1000) : null;
}

export function render(main, session) {
  let finetunes = new Map();  // id → name, the account's own
  let page = 1;
  let generation = 0;

  // --- settings
  const enabled = h("input", { id: "logs-enabled", type: "checkbox" });
  const retention = h("input", { id: "logs-retention", type: "number", min: 1, step: 1, required: true });
  const settingsSave = h("button", { id: "logs-settings-save", type: "submit" }, "Save");
  const settingsError = h("p", { id: "logs-settings-error", class: "error", role: "alert", hidden: true });
  const settingsDone = h("span", { id: "logs-settings-done", class: "ok small", role: "status" });
  const settings = h("form", { id: "logs-settings", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    showError(settingsError, "");
    settingsDone.textContent = "";
    settingsSave.disabled = true;
    try {
      const saved = (await api(session, "/logs/settings", { method: "PUT",
        json: { enabled: enabled.checked, retention_days: Number(retention.value) } })).result;
      showSettings(saved);
      settingsDone.textContent = saved.enabled ? "Saved: new requests are logged." : "Saved: new requests are not logged.";
    } catch (e) {
      showError(settingsError, `Could not save the settings: ${e instanceof ApiFailure ? e.message : e}`);
    } finally {
      settingsSave.disabled = false;
    }
  } },
    h("h2", {}, "Request logging"),
    h("p", { class: "muted small" }, "When on, this account's generation requests (Workers AI ", h("code", {}, "ai/run"),
      ", OpenAI chat and completions) are kept with their answers; a request's ", h("code", {}, "cf-aig-collect-log"),
      " header overrides this for that request."),
    h("div", { class: "row wrap" }, h("label", { class: "check" }, enabled, " Log this account's requests"),
      h("label", { class: "inline" }, "Keep for (days) ", retention), settingsSave, settingsDone),
    settingsError);
  function showSettings(s) {
    enabled.checked = Boolean(s.enabled);
    retention.value = s.retention_days;
  }

  // --- filters
  const finetuneFilter = h("select", { id: "filter-finetune" }, h("option", { value: "" }, "Any model or finetune"));
  const since = h("input", { id: "filter-since", type: "datetime-local", step: 1 });
  const until = h("input", { id: "filter-until", type: "datetime-local", step: 1 });
  const feedbackFilter = h("select", { id: "filter-feedback" }, h("option", { value: "" }, "Any feedback"),
    h("option", { value: "1" }, FEEDBACK_LABELS[1]), h("option", { value: "-1" }, FEEDBACK_LABELS[-1]),
    h("option", { value: "none" }, "No feedback yet"));
  const filters = h("form", { id: "logs-filters", class: "filters", onsubmit: (event) => { event.preventDefault(); page = 1; refresh(); } },
    h("label", { class: "inline" }, "Finetune ", finetuneFilter), h("label", { class: "inline" }, "From ", since),
    h("label", { class: "inline" }, "To ", until), h("label", { class: "inline" }, "Feedback ", feedbackFilter),
    h("button", { id: "filter-apply", type: "submit" }, "Show"));
  /** The filters as the API's fields (only those set). */
  function chosenFilters() {
    const out = {};
    if (finetuneFilter.value) out.finetune = finetuneFilter.value;
    if (since.value) out.since = unixSeconds(since.value);
    if (until.value) out.until = unixSeconds(until.value);
    if (feedbackFilter.value) out.feedback = feedbackFilter.value;
    return out;
  }

  // --- the list
  const listError = h("p", { id: "logs-error", class: "error", role: "alert", hidden: true });
  const rows = h("tbody", { id: "log-rows" });
  const table = h("table", { id: "logs-table" }, h("thead", {}, h("tr", {},
    ["Time", "Finetune", "Prompt", "Response", "Tokens", "Time taken", "Feedback", ""].map((t) => h("th", { scope: "col" }, t)))), rows);
  const pageText = h("span", { id: "logs-page", class: "muted small" }, "Loading…");
  const prev = h("button", { id: "logs-prev", type: "button", class: "small", onclick: () => { page -= 1; refresh(); } }, "← Newer");
  const next = h("button", { id: "logs-next", type: "button", class: "small", onclick: () => { page += 1; refresh(); } }, "Older →");

  // --- export
  const filename = h("input", { id: "export-filename", maxlength: 200, spellcheck: "false", placeholder: "logs-export.jsonl" });
  const exportButton = h("button", { id: "export", type: "submit" }, "Export as a dataset");
  const exportError = h("p", { id: "export-error", class: "error", role: "alert", hidden: true });
  const exportDone = h("p", { id: "export-done", class: "ok", role: "status" });
  const exporter = h("form", { id: "logs-export", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    showError(exportError, "");
    exportDone.replaceChildren();
    exportButton.disabled = true;
    try {
      const body = chosenFilters();
      if (filename.value.trim()) body.filename = filename.value.trim();
      const file = (await api(session, "/logs/export", { method: "POST", json: body })).result;
      exportDone.replaceChildren(`Exported ${file.filename} as ${file.id} (${file.bytes} bytes): `,
        h("a", { href: "#/datasets" }, "see it in Datasets"), " · ",
        h("a", { href: `#/jobs?file=${encodeURIComponent(file.id)}` }, "train on it"), ".");
    } catch (e) {
      showError(exportError, `Export failed: ${e instanceof ApiFailure ? e.message : e}`);
    } finally {
      exportButton.disabled = false;
    }
  } },
    h("h2", {}, "Export to a dataset"),
    h("p", { class: "muted small" }, "The entries the filters above select become a chat-format JSONL file (one ",
      h("code", {}, '{"messages": […]}'), " per entry; a correction replaces the original response; left out: raw prompts, ",
      "and entries marked −1 or cut short by an error without a correction)."),
    h("div", { class: "row" }, h("label", { class: "inline grow" }, "File name ", filename), exportButton), exportError, exportDone);

  const detail = detailDialog(session, (entry) => replaceRow(entry), () => refresh());
  main.append(h("h1", {}, "Request logs"), settings,
    h("section", { class: "card" }, h("h2", {}, "Entries"), filters, listError,
      h("div", { class: "table-wrap" }, table), h("div", { class: "row" }, prev, next, pageText)),
    exporter, detail.element, detail.confirm.element);

  function replaceRow(entry) {
    const old = rows.querySelector(`tr[data-id="${CSS.escape(entry.id)}"]`);
    if (old) old.replaceWith(row(entry));
  }

  async function setFeedback(entry, value, button) {
    button.disabled = true;
    try {
      const updated = (await api(session, `/logs/${encodeURIComponent(entry.id)}`, { method: "PATCH",
        json: { feedback: entry.feedback === value ? null : value } })).result;
      replaceRow(updated);
      const again = rows.querySelector(`tr[data-id="${CSS.escape(entry.id)}"] button[data-feedback="${value}"]`);
      if (again) again.focus();  // keep the keyboard where it was
    } catch (e) {
      button.disabled = false;
      showError(listError, `Could not save the feedback: ${e.message || e}`);
    }
  }

  function row(entry) {
    const vote = (value, symbol) => {
      const button = h("button", { type: "button", class: "small vote", "data-feedback": value, "aria-pressed": String(entry.feedback === value),
        "aria-label": `${FEEDBACK_LABELS[value]} for the answer at ${formatTime(entry.created_at, true)}` }, symbol);
      button.addEventListener("click", () => setFeedback(entry, value, button));
      return button;
    };
    const response = entry.corrected_response ?? entry.response;
    const who = entry.finetune ? (finetunes.get(entry.finetune) || entry.finetune) : "base model";
    return h("tr", { "data-id": entry.id, "data-feedback": entry.feedback === null ? "none" : String(entry.feedback) },
      h("td", { class: "nowrap" }, formatTime(entry.created_at, true)),
      h("td", { class: "small" }, who, h("div", { class: "muted" }, entry.dialect)),
      h("td", { class: "clip" }, promptText(entry)),
      h("td", { class: "clip" }, entry.corrected_response !== null && entry.corrected_response !== undefined
        ? [h("span", { class: "badge" }, "corrected"), " "] : null, response),
      h("td", { class: "num" }, `${entry.prompt_tokens} + ${entry.completion_tokens}`),
      h("td", { class: "num" }, `${entry.duration_ms} ms`),
      h("td", { class: "nowrap" }, vote(1, "+1"), " ", vote(-1, "−1")),
      h("td", {}, h("button", { type: "button", class: "small", "aria-label": `Open the entry of ${formatTime(entry.created_at, true)}`,
        onclick: () => detail.show(entry, who) }, "Open")));
  }

  async function refresh() {
    const mine = ++generation;
    const query = new URLSearchParams({ page: String(page), per_page: String(PER_PAGE) });
    for (const [key, value] of Object.entries(chosenFilters())) query.set(key, String(value));
    try {
      const body = await api(session, `/logs?${query}`);
      if (mine !== generation) return;
      showError(listError, "");
      const info = body.result_info || {};
      const pages = Math.max(info.total_pages || 1, 1);
      if (!body.result.length && page > pages) { page = pages; refresh(); return; }  // the last entries of a page went
      rows.replaceChildren(...body.result.map(row));
      if (!body.result.length) {
        rows.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, enabled.checked || info.total_count
          ? "No entries match these filters." : "No entries: turn request logging on above, then make requests.")));
      }
      pageText.textContent = `Page ${page} of ${pages} · ${info.total_count ?? body.result.length} entries`;
      prev.disabled = page <= 1;
      next.disabled = page >= pages;
    } catch (e) {
      if (mine === generation) showError(listError, `Could not list the logs: ${e.message || e}`);
    }
  }

  (async () => {
    try {
      showSettings((await api(session, "/logs/settings")).result);
    } catch (e) {
      showError(settingsError, `Could not read the settings: ${e.message || e}`);
    }
    try {
      const own = await listAll(session, "/finetunes");
      finetunes = new Map(own.map((f) => [f.id, f.name]));
      finetuneFilter.append(...own.map((f) => h("option", { value: f.id }, f.name)));
    } catch { /* the filter offers "any" only; the list still loads */ }
    await refresh();
  })();
  return () => { generation += 1; };
}

/** The entry's whole exchange and its correction; delete after a confirmation. `changed(entry)`
 *  gets each saved entry, `deleted()` is called once the entry is gone. */
function detailDialog(session, changed, deleted) {
  let current = null;
  const title = h("h2", { id: "log-title" });
  const transcript = h("div", { id: "log-transcript", class: "transcript short" });
  const correction = h("textarea", { id: "log-correction", rows: 5 });
  const error = h("p", { id: "log-error", class: "error", role: "alert", hidden: true });
  const saved = h("p", { id: "log-saved", class: "ok", role: "status" });
  const save = h("button", { id: "log-save", type: "button" }, "Save correction");
  const clear = h("button", { id: "log-clear", type: "button", class: "small" }, "Remove correction");
  const close = h("button", { id: "log-close", type: "button" }, "Close");
  const remove = h("button", { id: "log-delete", type: "button", class: "danger" }, "Delete entry");
  const confirm = confirmDialog();
  const element = h("dialog", { id: "log-dialog", "aria-labelledby": "log-title" }, title, transcript,
    h("label", { for: "log-correction" }, "Corrected response (used instead of the original when exported)"), correction,
    error, saved, h("div", { class: "row" }, remove, h("span", { class: "grow" }), clear, save, close));
  close.addEventListener("click", () => element.close());

  async function patch(body, done) {
    showError(error, "");
    saved.textContent = "";
    try {
      current = (await api(session, `/logs/${encodeURIComponent(current.id)}`, { method: "PATCH", json: body })).result;
      saved.textContent = done;
      fill();
      changed(current);
    } catch (e) {
      showError(error, `Could not save: ${e.message || e}`);
    }
  }
  remove.addEventListener("click", async () => {
    if (!(await confirm.ask("Delete this log entry? It is gone for good, and no export will hold it."))) return;
    showError(error, "");
    try {
      await api(session, `/logs/${encodeURIComponent(current.id)}`, { method: "DELETE" });
      element.close();
      deleted();
    } catch (e) {
      showError(error, `Could not delete: ${e.message || e}`);
    }
  });
  save.addEventListener("click", () => patch({ corrected_response: correction.value }, "Correction saved."));
  clear.addEventListener("click", () => patch({ corrected_response: null }, "Correction removed."));

  function fill() {
    const turns = current.prompt !== null && current.prompt !== undefined
      ? [{ role: "raw prompt", content: current.prompt }] : current.messages;
    transcript.replaceChildren(...turns.map((m) => h("div", { class: `turn ${m.role === "user" ? "user" : ""}` },
      h("span", { class: "who" }, m.role), m.content)),
      h("div", { class: "turn" }, h("span", { class: "who" }, `response (${current.finish_reason || "—"})`), current.response));
    correction.value = current.corrected_response ?? current.response;
    clear.disabled = current.corrected_response === null || current.corrected_response === undefined;
  }

  return {
    element,
    confirm,
    show(entry, who) {
      current = entry;
      title.textContent = `${formatTime(entry.created_at, true)} · ${who} · ${entry.model}`;
      showError(error, "");
      saved.textContent = "";
      fill();
      element.showModal();
      correction.focus();
    },
  };
}
