// Jobs page: start a fine-tuning job on one of the account's dataset files (OpenAI fine-tuning
// jobs, …/ai/v1/fine_tuning/jobs: epochs, LoRA rank, batch size, learning-rate multiplier,
// suffix), list the account's jobs, cancel a queued or running one, and watch one: its status,
// its training-loss curve drawn live from the job's events (losschart.js), its event log, and
// the finetune it produced. Polls every POLL_MS while a job is queued or running.
// `#/jobs?file=FILE_ID` preselects a dataset; `#/jobs?job=JOB_ID` watches that job.

import { ApiFailure, api } from "./api.js";
import { listDatasets } from "./datasets.js";
import { formatUnixTime, h, showError } from "./dom.js";
import { lossChart } from "./losschart.js";

const POLL_MS = 1000;
const ACTIVE = new Set(["validating_files", "queued", "running"]);

/** "BASE:NAME" (a job's fine_tuned_model) → NAME, the finetune's name in this account. */
export function finetuneName(fineTunedModel) {
  return fineTunedModel ? fineTunedModel.slice(fineTunedModel.lastIndexOf(":") + 1) : null;
}

function hashParams() {
  return new URLSearchParams((location.hash.split("?")[1]) || "");
}

/** A hyperparameter field: empty means the server's default; the server checks the ranges and
 *  its refusal is shown as it words it (the page repeats no default and no bound). */
function number(id, step) {
  return h("input", { id, type: "number", step, placeholder: "default" });
}

export function render(main, session) {
  const params = hashParams();
  let files = [];
  let jobs = [];
  let watched = params.get("job");
  let timer = null, stopped = false, round = 0;

  // --- the form that starts a job
  const fileSelect = h("select", { id: "job-file", required: true });
  const epochs = number("job-epochs", 1);
  const rank = number("job-rank", 1);
  const batch = number("job-batch-size", 1);
  const lr = number("job-lr", "any");
  const suffix = h("input", { id: "job-suffix", maxlength: 40, pattern: "[A-Za-z0-9._\\-]+", spellcheck: "false",
    placeholder: "ft", title: "1–40 letters, digits, dot, dash or underscore: the finetune is named SUFFIX-<job id>" });
  const start = h("button", { id: "job-start", type: "submit" }, "Start training");
  const formError = h("p", { id: "job-error", class: "error", role: "alert", hidden: true });
  const started = h("p", { id: "job-started", class: "ok", role: "status" });
  const form = h("form", { id: "job-form", class: "card", onsubmit: async (event) => {
    event.preventDefault();
    showError(formError, "");
    started.textContent = "";
    if (!fileSelect.value) { showError(formError, "Choose a dataset file first (upload one on the Datasets page)."); return; }
    const hyperparameters = {};
    for (const [name, field] of [["n_epochs", epochs], ["rank", rank], ["batch_size", batch], ["learning_rate_multiplier", lr]]) {
      if (field.value !== "") hyperparameters[name] = Number(field.value);
    }
    const body = { model: session.model, training_file: fileSelect.value, hyperparameters };
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    start.disabled = true;
    try {
      const job = await api(session, "/v1/fine_tuning/jobs", { method: "POST", json: body });
      started.textContent = `Started ${job.id}: it is ${job.status}.`;
      watch(job.id);
    } catch (e) {
      showError(formError, `The job was not started: ${e instanceof ApiFailure ? e.message : e}`);
    } finally {
      start.disabled = false;
    }
  } },
    h("h2", {}, "Start a fine-tuning job"),
    h("p", { class: "muted small" }, `Trains a LoRA adapter for ${session.model} on a dataset file; when the job succeeds `,
      "the adapter becomes a finetune of this account, usable like an uploaded one."),
    h("label", { for: "job-file" }, "Dataset file"), fileSelect,
    h("div", { class: "row wrap" },
      h("label", { class: "inline" }, "Epochs ", epochs), h("label", { class: "inline" }, "LoRA rank ", rank),
      h("label", { class: "inline" }, "Batch size ", batch), h("label", { class: "inline" }, "Learning-rate multiplier ", lr)),
    h("label", { for: "job-suffix" }, "Suffix of the finetune's name (optional)"), suffix,
    h("div", { class: "row" }, start), formError, started);

  // --- the list of jobs
  const listError = h("p", { id: "jobs-error", class: "error", role: "alert", hidden: true });
  const rows = h("tbody", { id: "job-rows" });
  const caption = h("caption", { class: "muted" }, "Loading…");
  const table = h("table", { id: "jobs-table" }, caption, h("thead", {}, h("tr", {},
    ["Job", "Created", "Status", "Dataset", "Epochs", "Rank", "Finetune", ""].map((t) => h("th", { scope: "col" }, t)))), rows);

  // --- the watched job
  const watchTitle = h("h2", { id: "watch-title", tabindex: -1 }, "Watch a job");
  const watchStatus = h("p", { id: "watch-status", class: "muted" }, "Choose “Watch” on a job, or start one.");
  const chart = lossChart("loss-chart");
  const watchResult = h("p", { id: "watch-finetune", class: "watch-result" }, "\u00a0");
  const events = h("ol", { id: "job-events", class: "events", reversed: true, "aria-label": "The job's events, newest first" });
  const watchCard = h("section", { id: "job-watch", class: "card" }, watchTitle, watchStatus,
    h("div", { class: "chart-box" }, chart.element), watchResult, h("h3", {}, "Events"), events);

  main.append(h("h1", {}, "Fine-tuning jobs"), form,
    h("section", { class: "card" }, h("h2", {}, "Your jobs"), listError, h("div", { class: "table-wrap" }, table)), watchCard);

  function fileLabel(id) {
    const f = files.find((x) => x.id === id);
    return f ? `${f.filename} (${id})` : id;
  }

  function watch(jobId) {
    watched = jobId;
    params.set("job", jobId);
    history.replaceState(null, "", `#/jobs?${params}`);  // a reload or "back" shows this job again
    chart.update([]);
    events.replaceChildren();
    for (const el of [watchStatus, chart.element, events, watchResult]) delete el.dataset.signature;
    tick();
    watchTitle.focus({ preventScroll: true });  // keyboard users continue at the job they chose
    watchCard.scrollIntoView({ block: "nearest" });
  }

  function row(job) {
    const hp = job.method.supervised.hyperparameters;
    const name = finetuneName(job.fine_tuned_model);
    const cancel = ACTIVE.has(job.status) ? h("button", { type: "button", class: "danger small", "aria-label": `Cancel ${job.id}`,
      onclick: async () => {
        cancel.disabled = true;
        try { await api(session, `/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }); }
        catch (e) { showError(listError, `Could not cancel ${job.id}: ${e.message || e}`); }
        tick();
      } }, "Cancel") : null;
    return h("tr", { "data-id": job.id, "data-status": job.status, class: job.id === watched ? "selected" : null },
      h("th", { scope: "row", class: "mono" }, job.id, job.suffix ? h("div", { class: "muted small" }, `suffix ${job.suffix}`) : null),
      h("td", {}, formatUnixTime(job.created_at)), h("td", {}, h("span", { class: `state state-${job.status}` }, job.status)),
      h("td", { class: "small" }, fileLabel(job.training_file)), h("td", { class: "num" }, String(hp.n_epochs)),
      h("td", { class: "num" }, String(hp.rank)), h("td", {}, name || h("span", { class: "muted" }, "—")),
      h("td", { class: "actions" }, h("button", { type: "button", class: "small", "aria-label": `Watch ${job.id}`,
        onclick: () => watch(job.id) }, "Watch"), cancel));
  }

  /** Render the list, replacing only the rows whose job changed: a focused button in an
   *  unchanged row keeps the focus while the page polls. */
  const shownRows = new Map();  // job id → {signature, tr}
  function showRows() {
    const wanted = jobs.map((job) => {
      const signature = JSON.stringify([job, job.id === watched, fileLabel(job.training_file)]);
      const old = shownRows.get(job.id);
      if (old && old.signature === signature) return old.tr;
      const tr = row(job);
      shownRows.set(job.id, { signature, tr });
      return tr;
    });
    const current = [...rows.children];
    const sameJobs = current.length === wanted.length && current.every((tr, i) => tr.dataset.id === wanted[i].dataset.id);
    if (!sameJobs) { rows.replaceChildren(...wanted); return; }
    current.forEach((tr, i) => { if (tr !== wanted[i]) tr.replaceWith(wanted[i]); });
  }

  /** Rebuild `el` with `build()` only when `signature` differs from the last one it was built
   *  with: a poll that brings nothing new leaves the page (and a focused link) alone. */
  function renderIfChanged(el, signature, build) {
    if (el.dataset.signature === signature) return;
    el.dataset.signature = signature;
    build();
  }

  async function showWatched(job, isLatest) {
    const all = (await api(session, `/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/events`)).data;
    if (!isLatest()) return;
    const hp = job.method.supervised.hyperparameters;
    const name = finetuneName(job.fine_tuned_model);
    const metrics = all.filter((e) => e.data && typeof e.data.train_loss === "number");
    watchTitle.textContent = `Job ${job.id}`;
    renderIfChanged(watchStatus, JSON.stringify([job, fileLabel(job.training_file)]), () => watchStatus.replaceChildren(
      h("span", { id: "watch-state", class: `state state-${job.status}` }, job.status),
      ` on ${fileLabel(job.training_file)} · ${hp.n_epochs} epochs · rank ${hp.rank} · batch ${hp.batch_size}` +
      ` · learning-rate multiplier ${hp.learning_rate_multiplier}`));
    renderIfChanged(chart.element, JSON.stringify(metrics), () => chart.update(
      metrics.map((e) => ({ step: e.data.step, loss: e.data.train_loss })), metrics.length ? metrics[0].data.total_steps : null));
    renderIfChanged(events, JSON.stringify(all), () => events.replaceChildren(...all.map((e) => h("li", { class: e.level === "error" ? "error" : null },
      h("span", { class: "muted" }, formatUnixTime(e.created_at, true)), " ", e.message))));
    renderIfChanged(watchResult, JSON.stringify([job.id, job.status, job.fine_tuned_model, job.error]), () => {
      if (job.status === "succeeded" && name) {
        watchResult.replaceChildren("Produced the finetune ", h("strong", { id: "watch-finetune-name" }, name),
          ` (use it as lora "${name}", or as model "${job.fine_tuned_model}" in the OpenAI dialect): `,
          h("a", { href: "#/finetunes" }, "see it in Finetunes"), " · ",
          h("a", { href: `#/playground?finetune=${encodeURIComponent(name)}` }, "try it in the Playground against the base model"), ".");
      } else if (job.status === "failed") {
        watchResult.replaceChildren(h("span", { class: "error" }, `The job failed: ${job.error ? job.error.message : "no reason given"}`));
      } else if (job.status === "cancelled") {
        watchResult.textContent = "The job was cancelled: nothing was published.";
      } else {
        watchResult.textContent = "The finetune appears here when the job succeeds.";
      }
    });
  }

  let settle = 0;  // polls go on a few rounds after the last job ends, for the events written after its status
  async function tick() {
    clearTimeout(timer);
    const mine = ++round;
    const isLatest = () => mine === round && !stopped;
    try {
      [jobs, files] = await Promise.all([api(session, "/v1/fine_tuning/jobs").then((b) => b.data), listDatasets(session)]);
      if (!isLatest()) return;
      showError(listError, "");
      fillFiles();
      caption.textContent = jobs.length ? `${jobs.length} job${jobs.length === 1 ? "" : "s"}` : "No jobs yet: start one above.";
      showRows();
      const job = jobs.find((j) => j.id === watched);
      if (job) await showWatched(job, isLatest);
      else if (watched) watchStatus.textContent = `No job ${watched} in this account.`;
    } catch (e) {
      if (isLatest()) showError(listError, `Could not read the jobs: ${e.message || e}`);
    }
    if (!isLatest()) return;
    settle = jobs.some((j) => ACTIVE.has(j.status)) ? 4 : settle - 1;
    if (settle > 0) timer = setTimeout(tick, POLL_MS);
  }

  let filled = false;
  function fillFiles() {
    const keep = fileSelect.value || params.get("file");
    const known = files.map((f) => f.id).join(",");
    if (filled && fileSelect.dataset.known === known) return;  // do not disturb a choice in progress
    fileSelect.dataset.known = known;
    fileSelect.replaceChildren(...(files.length ? files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`))
      : [h("option", { value: "" }, "No dataset files yet: upload one on the Datasets page")]));
    if (keep && files.some((f) => f.id === keep)) fileSelect.value = keep;
    filled = true;
  }

  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
