// Finetunes page: the account's own finetunes (never another account's), upload of the two PEFT
// files (chosen or dropped) with a progress bar and the server's refusals inline, delete with a
// confirmation. Rank and targets come from each finetune's stored adapter_config.json.

import { ApiFailure, api, listAll, uploadAsset } from "./api.js";
import { confirmDialog, formatBytes, formatTime, h, showError } from "./dom.js";

const CONFIG = "adapter_config.json";
const WEIGHTS = "adapter_model.safetensors";

/** Which of the two files `file` is: by exact name, else by extension; null if neither. */
function slotOf(file) {
  if (file.name === CONFIG || (file.name.endsWith(".json"))) return CONFIG;
  if (file.name === WEIGHTS || file.name.endsWith(".safetensors")) return WEIGHTS;
  return null;
}

/** One finetune's details for the table: size (sum of its files) and LoRA rank/targets. */
async function details(session, finetune) {
  const id = encodeURIComponent(finetune.id);
  const full = (await api(session, `/finetunes/${id}`)).result;
  const size = full.assets.reduce((total, asset) => total + asset.size, 0);
  let rank = "—", targets = "—";
  if (full.assets.some((asset) => asset.file_name === CONFIG)) {
    try {
      const config = await api(session, `/finetunes/${id}/finetune-assets/${CONFIG}`);
      rank = config.r ?? "—";
      const modules = config.target_modules;
      targets = Array.isArray(modules) ? [...modules].sort().join(", ") : (modules ?? "—");
    } catch (e) { rank = targets = "unreadable"; }
  }
  return { ...full, size: full.assets.length ? size : null, rank, targets };
}

export function render(main, session) {
  const listError = h("p", { id: "list-error", class: "error", role: "alert", hidden: true });
  const body = h("tbody", { id: "finetune-rows" });
  const caption = h("caption", { class: "muted" }, "Loading…");
  const table = h("table", { id: "finetunes-table" }, caption,
    h("thead", {}, h("tr", {}, ["Name", "Model", "Rank", "Targets", "Size", "Created", "Public", "State", ""]
      .map((title) => h("th", { scope: "col" }, title)))), body);
  const dialog = confirmDialog();
  const form = uploadForm(session, () => refresh());
  main.append(h("h1", {}, "Finetunes"), form, h("section", { class: "card" }, h("h2", {}, "Your finetunes"),
    listError, h("div", { class: "table-wrap" }, table)), dialog.element);

  let generation = 0;
  async function refresh() {
    const mine = ++generation;
    showError(listError, "");
    try {
      const finetunes = await listAll(session, "/finetunes");
      const rows = await Promise.all(finetunes.map((f) => details(session, f)));
      if (mine !== generation) return;
      caption.textContent = rows.length ? `${rows.length} finetune${rows.length === 1 ? "" : "s"}` : "No finetunes yet: upload one above.";
      body.replaceChildren(...rows.map((f) => row(f)));
    } catch (e) {
      if (mine === generation) showError(listError, `Could not list the finetunes: ${e.message || e}`);
    }
  }

  function row(f) {
    const remove = h("button", { type: "button", class: "danger", "aria-label": `Delete ${f.name}`, onclick: async () => {
      if (!(await dialog.ask(`Delete finetune “${f.name}”? Requests already running with it finish first; new ones are refused.`))) return;
      remove.disabled = true;
      try {
        await api(session, `/finetunes/${encodeURIComponent(f.id)}`, { method: "DELETE" });
        await refresh();
      } catch (e) {
        remove.disabled = false;
        showError(listError, `Could not delete ${f.name}: ${e.message || e}`);
      }
    } }, "Delete");
    const state = h("span", { class: `state state-${f.state}`, title: f.state_reason || "" }, f.state);
    return h("tr", { "data-name": f.name, "data-id": f.id },
      h("th", { scope: "row" }, f.name, f.description ? h("div", { class: "muted small" }, f.description) : null),
      h("td", {}, f.model), h("td", { class: "num" }, String(f.rank)), h("td", { class: "targets" }, f.targets),
      h("td", { class: "num" }, formatBytes(f.size)), h("td", {}, formatTime(f.created_at)),
      h("td", {}, f.public ? "public" : "private"),
      h("td", {}, state, f.state_reason ? h("div", { class: "error small" }, f.state_reason) : null),
      h("td", {}, remove));
  }

  refresh();
  return () => { generation += 1; };
}

function uploadForm(session, uploaded) {
  const files = { [CONFIG]: null, [WEIGHTS]: null };
  const name = h("input", { id: "ft-name", required: true, maxlength: 64, pattern: "[A-Za-z0-9._\\-]+", spellcheck: "false",
    title: "1–64 letters, digits, dot, dash or underscore" });
  const description = h("input", { id: "ft-description", maxlength: 4096 });
  const isPublic = h("input", { id: "ft-public", type: "checkbox" });
  const picker = h("input", { id: "ft-files", type: "file", multiple: true, accept: ".json,.safetensors" });
  const chosen = h("ul", { id: "chosen-files", class: "files" });
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0 });
  const progressText = h("span", { id: "upload-progress-text", class: "muted" }, "");
  const error = h("p", { id: "upload-error", class: "error", role: "alert", hidden: true });
  const done = h("p", { id: "upload-done", class: "ok", role: "status" });
  const submit = h("button", { id: "upload", type: "submit" }, "Upload");

  function take(list) {
    const refused = [];
    for (const file of list) {
      const slot = slotOf(file);
      if (slot) files[slot] = file; else refused.push(file.name);
    }
    chosen.replaceChildren(...[CONFIG, WEIGHTS].map((slot) => h("li", {},
      h("code", {}, slot), ": ", files[slot] ? `${files[slot].name} (${formatBytes(files[slot].size)})` : h("span", { class: "muted" }, "not chosen yet"))));
    showError(error, refused.length ? `Not a PEFT adapter file: ${refused.join(", ")} (choose ${CONFIG} and ${WEIGHTS})` : "");
  }
  take([]);
  picker.addEventListener("change", () => take(picker.files));
  const drop = h("label", { id: "drop-zone", class: "drop", for: "ft-files" },
    h("strong", {}, "Drop the two PEFT files here"), h("span", { class: "muted" }, ` (${CONFIG} and ${WEIGHTS}) or choose them: `), picker);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); take(event.dataTransfer.files); });

  const form = h("form", { id: "upload-form", class: "card", novalidate: false, onsubmit: async (event) => {
    event.preventDefault();
    showError(error, "");
    done.textContent = "";
    if (!files[CONFIG] || !files[WEIGHTS]) { showError(error, `Choose both ${CONFIG} and ${WEIGHTS}.`); return; }
    submit.disabled = true;
    const total = files[CONFIG].size + files[WEIGHTS].size;
    let sentBefore = 0;
    const show = (sent) => { progress.value = total ? sent / total : 1; progressText.textContent = `${formatBytes(sent)} of ${formatBytes(total)}`; };
    show(0);
    let stage = "creating the finetune";
    try {
      const created = await api(session, "/finetunes", { method: "POST", json: {
        model: session.model, name: name.value.trim(), description: description.value, public: isPublic.checked } });
      for (const slot of [CONFIG, WEIGHTS]) {
        stage = `uploading ${slot}`;
        await uploadAsset(session, created.result.id, slot, files[slot], (sent) => show(sentBefore + Math.min(sent, files[slot].size)));
        sentBefore += files[slot].size;
        show(sentBefore);
      }
      done.textContent = `Uploaded ${name.value.trim()}: ready to use as lora "${name.value.trim()}".`;
      form.reset();
      files[CONFIG] = files[WEIGHTS] = null;
      take([]);
    } catch (e) {
      showError(error, `Upload failed while ${stage}: ${e instanceof ApiFailure ? e.message : e}`);
    } finally {
      submit.disabled = false;
      uploaded();
    }
  } },
    h("h2", {}, "Upload a finetune"),
    h("div", { class: "grid2" },
      h("div", {}, h("label", { for: "ft-name" }, "Name"), name),
      h("div", {}, h("label", { for: "ft-description" }, "Description (optional)"), description)),
    h("label", { class: "check" }, isPublic, " Public: other accounts may use it by its id (they can never change it)"),
    drop, chosen, h("div", { class: "row" }, submit, progress, progressText), error, done);
  return form;
}
