// The console's shell: sign-in, navigation by URL hash (#/finetunes, #/playground, #/logs,
// #/datasets, #/jobs, #/status; a page may read parameters after "?"), one page rendered into
// <main> at a time. A page module exports render(main, session) and may
// return a cleanup function (stop polling, abort streams) called before the next page renders.

import { ApiFailure, api, getSession, setSession } from "./api.js";
import { h, showError } from "./dom.js";
import * as datasets from "./datasets.js";
import * as finetunes from "./finetunes.js";
import * as jobs from "./jobs.js";
import * as logs from "./logs.js";
import * as playground from "./playground.js";
import * as status from "./status.js";

const PAGES = { finetunes, playground, logs, datasets, jobs, status };
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOutButton = document.getElementById("sign-out");
let cleanup = null;

function renderSignIn() {
  const error = h("p", { id: "sign-in-error", class: "error", role: "alert", hidden: true });
  const account = h("input", { id: "account-id", name: "account", required: true, autocomplete: "username", spellcheck: "false" });
  const token = h("input", { id: "api-token", name: "token", type: "password", required: true, autocomplete: "current-password" });
  const button = h("button", { id: "sign-in", type: "submit" }, "Sign in");
  const form = h("form", { id: "sign-in-form", class: "card narrow", onsubmit: async (event) => {
    event.preventDefault();
    showError(error, "");
    button.disabled = true;
    button.textContent = "Signing in…";
    const session = { accountId: account.value.trim(), token: token.value.trim() };
    try {
      const models = await api(session, "/models/search");  // checks the token against the account
      session.model = models.result[0].name;
      setSession(session);
      location.hash = "#/finetunes";
      route();
    } catch (e) {
      showError(error, e instanceof ApiFailure ? `Sign-in failed: ${e.message}` : `Sign-in failed: ${e}`);
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  } },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Your account id and an API token (", h("code", {}, "loraplex accounts create"),
      "). They are kept in this browser tab only and sent to this server's API."),
    h("label", { for: "account-id" }, "Account id"), account,
    h("label", { for: "api-token" }, "API token"), token,
    error, button);
  main.replaceChildren(form);
  account.focus();
}

function route(event) {
  if (cleanup) { cleanup(); cleanup = null; }
  const session = getSession();
  nav.hidden = signOutButton.hidden = !session;
  who.textContent = session ? `account ${session.accountId}` : "";
  if (!session) { renderSignIn(); return; }
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  const page = PAGES[name] ? name : "finetunes";
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${link(page)} · loraplex console`;
  main.replaceChildren();
  try {
    cleanup = PAGES[page].render(main, session) || null;
    if (event && event.type === "hashchange") main.focus({ preventScroll: true });  // keyboard users start at the new page
  } catch (e) {
    main.replaceChildren(h("p", { class: "error", role: "alert" }, `This page failed to render: ${e}`));
  }
}

function link(page) {
  return nav.querySelector(`a[data-page="${page}"]`).textContent;
}

signOutButton.addEventListener("click", () => {
  setSession(null);
  location.hash = "";
  route();
});
window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (event) => {
  const banner = h("p", { class: "error", role: "alert" }, `Something failed: ${event.reason && event.reason.message || event.reason}`);
  main.prepend(banner);
});
route();
