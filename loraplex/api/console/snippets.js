// "Copy as": the request a playground column sends, as curl (Workers AI run), Python with
// Cloudflare's SDK, and Python with OpenAI's SDK. Tokens are read from CLOUDFLARE_API_TOKEN, never
// written into the snippet.

/** request: {model, lora, body} where body is the run body (messages or prompt+raw, sampling). */
export function curl(origin, session, request) {
  const url = `${origin}/client/v4/accounts/${session.accountId}/ai/run/${request.model}`;
  const body = JSON.stringify(runBody(request));
  return [`curl ${shellQuote(url)} \\`, `  -H "Authorization: Bearer $CLOUDFLARE_API_TOKEN" \\`,
    `  -H 'Content-Type: application/json' \\`, `  -d ${shellQuote(body)}`].join("\n");
}

export function cloudflarePython(origin, session, request) {
  const args = Object.entries(runBody(request)).map(([key, value]) => `    ${key}=${python(value)},`);
  return [
    "import os", "", "from cloudflare import Cloudflare", "",
    `client = Cloudflare(api_token=os.environ["CLOUDFLARE_API_TOKEN"], base_url=${python(origin + "/client/v4")})`,
    "result = client.ai.run(", `    ${python(request.model)},`, `    account_id=${python(session.accountId)},`, ...args, ")",
    'print(result["response"])',
  ].join("\n");
}

export function openaiPython(origin, session, request) {
  const body = request.body;
  const model = request.lora ? `${request.model}:${request.lora}` : request.model;
  const lines = ["import os", "", "from openai import OpenAI", "",
    `client = OpenAI(api_key=os.environ["CLOUDFLARE_API_TOKEN"], base_url=${python(`${origin}/client/v4/accounts/${session.accountId}/ai/v1`)})`];
  const sampling = [["max_tokens", body.max_tokens], ["temperature", body.temperature], ["top_p", body.top_p], ["seed", body.seed]]
    .filter(([, value]) => value !== undefined).map(([key, value]) => `    ${key}=${python(value)},`);
  if (body.raw) {
    lines.push("completion = client.completions.create(", `    model=${python(model)},`, `    prompt=${python(body.prompt)},`, ...sampling, ")",
      "print(completion.choices[0].text)");
  } else {
    lines.push("completion = client.chat.completions.create(", `    model=${python(model)},`, `    messages=${python(body.messages)},`,
      ...sampling, ")", "print(completion.choices[0].message.content)");
  }
  return lines.join("\n");
}

function runBody(request) {
  return request.lora ? { ...request.body, lora: request.lora } : { ...request.body };
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

/** A JSON value as a Python literal (strings through JSON's escapes, which Python reads too). */
function python(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(python).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${python(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}
