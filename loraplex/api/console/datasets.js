// Datasets page: the account's fine-tuning files (OpenAI Files API, …/ai/v1/files, purpose
// fine-tune) — the JSONL files uploaded here and those exported from the request logs. Upload by
// choosing or dropping one file, with a progress bar and the server's line-by-line refusal shown
// inline; preview the first lines; delete after a confirmation; "Train on it" opens the jobs page
// with the file chosen.

import { ApiFailure, accountBase, api, request, uploadDataset } from "./api.js";
import { confirmDialog, formatBytes, formatUnixTime, h, showError } from "./dom.js";

const PREVIEW_LINES = 20;

/** The account's files, newest first. */
export async function listDatasets(session) {
  const files = (await api(session, "/v1/files")).data;
  return files.sort((a, b) => b.created_at - a.created_at || (a.id < b.id ? -1 : 1));
}

export function render(main, session) {
  const listError = h("p", { id: "datasets-error", class: "error", role: "alert", hidden: true });
  const body = h("tbody", { id: "dataset-rows" });
  const caption = h("caption", { class: "muted" }, "Loading…");
  const table = h("table", { id: "datasets-table" }, caption,
    h("thead", {}, h("tr", {}, ["File name", "Id", "Size", "Created", ""].map((t) => h("th", { scope: "col" }, t)))), body);
  const dialog = confirmDialog();
  const preview = previewDialog();
  main.append(h("h1", {}, "Datasets"), uploadForm(session, () => refresh()),
    h("section", { class: "card" }, h("h2", {}, "Your dataset files"), listError, h("div", { class: "table-wrap" }, table)),
    dialog.element, preview.element);

  let generation = 0;
  async function refresh() {
    const mine = ++generation;
    try {
      const files = await listDatasets(session);
      if (mine !== generation) return;
      showError(listError, "");
      caption.textContent = files.length ? `${files.length} file${files.length === 1 ? "" : "s"}`
        : "No dataset files yet: upload a JSONL file above, or export request logs from the Logs page.";
      body.replaceChildren(...files.map(row));
    } catch (e) {
      if (mine === generation) showError(listError, `Could not list the dataset files: ${e.message || e}`);
    }
  }

  function row(f) {
    const remove = h("button", { type: "button", class: "danger small", "aria-label": `Delete ${f.filename}`, onclick: async () => {
      if (!(await dialog.ask(`Delete dataset file “${f.filename}” (${f.id})? A job that has not started training on it yet will fail.`))) return;
      remove.disabled = true;
      try {
        await api(session, `/v1/files/${encodeURIComponent(f.id)}`, { method: "DELETE" });
        await refresh();
      } catch (e) {
        remove.disabled = false;
        showError(listError, `Could not delete ${f.filename}: ${e.message || e}`);
      }
    } }, "Delete");
    const look = h("button", { type: "button", class: "small", "aria-label": `Preview ${f.filename}`,
      onclick: () => preview.show(session, f) }, "Preview");
    const train = h("a", { class: "button-link", href: `#/jobs?file=${encodeURIComponent(f.id)}`, "aria-label": `Train on ${f.filename}` }, "Train on it");
    return h("tr", { "data-id": f.id, "data-filename": f.filename },
      h("th", { scope: "row" }, f.filename || h("span", { class: "muted" }, "(no name)")),
      h("td", { class: "mono" }, f.id), h("td", { class: "num" }, formatBytes(f.bytes)),
      h("td", {}, formatUnixTime(f.created_at)), h("td", { class: "actions" }, look, train, remove));
  }

  refresh();
  return () => { generation += 1; };
}

function previewDialog() {
  const heading = h("h2", { id: "preview-title" });
  const code = h("pre", { id: "preview-content" });
  const close = h("button", { type: "button", id: "preview-close" }, "Close");
  const element = h("dialog", { id: "preview-dialog", "aria-labelledby": "preview-title" }, heading, code, h("div", { class: "row end" }, close));
  close.addEventListener("click", () => element.close());
  return {
    element,
    async show(session, file) {
      heading.textContent = `${file.filename} (${file.id})`;
      code.textContent = "Loading…";
      element.showModal();
      close.focus();
      try {
        const response = await request(`${accountBase(session)}/v1/files/${encodeURIComponent(file.id)}/content`, { token: session.token });
        const text = await response.text();
        const lines = text.split("\n").filter((l) => l.trim());
        code.textContent = lines.slice(0, PREVIEW_LINES).join("\n") +
          (lines.length > PREVIEW_LINES ? `\n… and ${lines.length - PREVIEW_LINES} more lines` : "");
      } catch (e) {
        code.textContent = `Could not read the file: ${e.message || e}`;
      }
    },
  };
}

function uploadForm(session, uploaded) {
  let chosen = null;
  const picker = h("input", { id: "dataset-file", type: "file", accept: ".jsonl,.json,.txt,application/jsonl" });
  const chosenText = h("p", { id: "dataset-chosen", class: "muted small" }, "No file chosen yet.");
  const progress = h("progress", { id: "dataset-progress", max: 1, value: 0 });
  const progressText = h("span", { id: "dataset-progress-text", class: "muted" }, "");
  const error = h("p", { id: "dataset-error", class: "error", role: "alert", hidden: true });
  const done = h("p", { id: "dataset-done", class: "ok", role: "status" });
  const submit = h("button", { id: "dataset-upload", type: "submit" }, "Upload");
  const take = (file) => {
    chosen = file || null;
    chosenText.textContent = chosen ? `${chosen.name} (${formatBytes(chosen.size)})` : "No file chosen yet.";
  };
  picker.addEventListener("change", () => take(picker.files[0]));
  const drop = h("label", { id: "dataset-drop", class: "drop", for: "dataset-file" },
    h("strong", {}, "Drop a JSONL file here"), h("span", { class: "muted" }, " or choose it: "), picker);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); take(event.dataTransfer.files[0]); });

  const form = h("form", { id: "dataset-form", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    showError(error, "");
    done.textContent = "";
    if (!chosen) { showError(error, "Choose a JSONL file first."); return; }
    submit.disabled = true;
    const size = chosen.size;  // the request's total also counts the multipart framing: shown as a share of the file
    const show = (sent, total) => {
      progress.value = total ? sent / total : 1;
      progressText.textContent = `${formatBytes(Math.round(size * progress.value))} of ${formatBytes(size)}`;
    };
    show(0, size);
    try {
      const file = await uploadDataset(session, chosen, show);
      show(1, 1);
      done.textContent = `Uploaded ${file.filename} as ${file.id} (${formatBytes(file.bytes)}).`;
      form.reset();
      take(null);
    } catch (e) {
      showError(error, `Upload failed: ${e instanceof ApiFailure ? e.message : e}`);
    } finally {
      submit.disabled = false;
      uploaded();
    }
  } },
    h("h2", {}, "Upload a dataset"),
    h("p", { class: "muted small" }, "Chat-format JSONL, one example per line: ",
      h("code", {}, '{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}'),
      ". Every line is checked (roles, content, length within the model's context); a refusal names the lines."),
    drop, chosenText, h("div", { class: "row" }, submit, progress, progressText), error, done);
  return form;
}
