// Every call the console makes: the public API with the signed-in account's token (sessionStorage
// only), and the operator sources (/metrics, /admin/adapters) with the operator's own tokens.
// Failures become ApiFailure with a message in words (the server's own message when it sent one).

const SESSION_KEY = "loraplex.console.session";
const OPERATOR_KEY = "loraplex.console.operator";
export const API_PREFIX = "/client/v4";

export class ApiFailure extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** {accountId, token, model} of the signed-in user, or null. */
export function getSession() {
  try { return JSON.parse(sessionStorage.getItem(SESSION_KEY)); } catch { return null; }
}
export function setSession(session) {
  if (session) sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  else sessionStorage.removeItem(SESSION_KEY);
}
/** {adminToken, metricsToken} for the operator view (either may be ""). */
export function getOperator() {
  try { return JSON.parse(sessionStorage.getItem(OPERATOR_KEY)) || {}; } catch { return {}; }
}
export function setOperator(tokens) { sessionStorage.setItem(OPERATOR_KEY, JSON.stringify(tokens)); }

/** The account's API base: /client/v4/accounts/{a}/ai */
export function accountBase(session) {
  return `${API_PREFIX}/accounts/${encodeURIComponent(session.accountId)}/ai`;
}

/** The error an answer carries, in words: Workers AI envelope, OpenAI shape, or the status. */
export function describeFailure(status, text) {
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const first = body && Array.isArray(body.errors) && body.errors[0];
  if (first && first.message) return new ApiFailure(`${first.message} (HTTP ${status}, code ${first.code})`, status, first.code);
  if (body && body.error && body.error.message) return new ApiFailure(`${body.error.message} (HTTP ${status})`, status);
  const hint = status === 401 ? "authentication failed" : status === 404 ? "not found" : "the server refused the request";
  return new ApiFailure(`${hint} (HTTP ${status})`, status);
}

function unreachable(error) {
  return new ApiFailure(`cannot reach the server (${error && error.message ? error.message : error})`);
}

/** fetch with a bearer token; throws ApiFailure unless the answer is 2xx. Returns the Response. */
export async function request(url, { method = "GET", token, json, signal } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, signal, body: json === undefined ? undefined : JSON.stringify(json) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw unreachable(error);
  }
  if (!response.ok) throw describeFailure(response.status, await response.text());
  return response;
}

/** A call to the account's API (path under …/ai); the parsed JSON answer. */
export async function api(session, path, options = {}) {
  const response = await request(accountBase(session) + path, { ...options, token: session.token });
  return response.json();
}

/** Every item of a paginated list route (Cloudflare's result_info), page by page. */
export async function listAll(session, path) {
  const items = [];
  for (let page = 1; ; page += 1) {
    const body = await api(session, `${path}?page=${page}&per_page=100`);
    items.push(...body.result);
    const info = body.result_info || {};
    if (!info.total_pages || page >= info.total_pages) return items;
  }
}

/** POST a multipart form with upload progress: onProgress(bytesSent, bytesTotal). Resolves to the
 *  parsed JSON answer on 2xx; rejects with ApiFailure otherwise (the server's message in words). */
function upload(url, token, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.upload.onprogress = (event) => { if (event.lengthComputable) onProgress(event.loaded, event.total); };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(describeFailure(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => reject(unreachable("the upload was interrupted"));
    xhr.send(form);
  });
}

/** POST one finetune file (multipart file_name + file) with upload progress:
 *  onProgress(bytesSent, bytesTotal). Resolves on 2xx; rejects with ApiFailure otherwise. */
export function uploadAsset(session, finetuneId, fileName, file, onProgress) {
  const form = new FormData();
  form.append("file_name", fileName);
  form.append("file", file, fileName);
  return upload(`${accountBase(session)}/finetunes/${encodeURIComponent(finetuneId)}/finetune-assets`,
    session.token, form, onProgress);
}

/** POST …/ai/v1/files (purpose fine-tune) with upload progress; resolves to the OpenAI file object. */
export function uploadDataset(session, file, onProgress) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return upload(`${accountBase(session)}/v1/files`, session.token, form, onProgress);
}

/** POST …/ai/run/{model} with stream: true; onText(delta) per text delta. Resolves to the final
 *  usage ({prompt_tokens, completion_tokens, total_tokens}); ApiFailure on a refusal or an error event. */
export async function streamRun(session, model, body, onText, signal) {
  const response = await request(`${accountBase(session)}/run/${model}`,
    { method: "POST", token: session.token, json: { ...body, stream: true }, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiFailure(`${parsed.error.message} (code ${parsed.error.code}, mid-stream)`, 200, parsed.error.code);
      if (parsed.response) onText(parsed.response);
      if (parsed.usage) usage = parsed.usage;
    }
  }
  return usage;
}
