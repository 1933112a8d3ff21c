// textgen playground: plain JS over the public HTTP API (the same calls any client makes).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = sessionStorage.getItem("textgen-api-key") || "";
keyInput.addEventListener("change", () => {
  sessionStorage.setItem("textgen-api-key", keyInput.value);
  loadInfo();
});

function headers() {
  const h = { "content-type": "application/json" };
  if (keyInput.value) h["authorization"] = `Bearer ${keyInput.value}`;
  return h;
}

// ---- tabs (arrow keys move between them, as the ARIA tabs pattern does) ----
const tabs = [...document.querySelectorAll('[role="tab"]')];
function select(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $("#" + t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
}
for (const t of tabs) {
  t.addEventListener("click", () => select(t));
  t.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(t);
    if (e.key === "ArrowRight") select(tabs[(i + 1) % tabs.length]);
    if (e.key === "ArrowLeft") select(tabs[(i - 1 + tabs.length) % tabs.length]);
  });
}

// ---- the model's name ----
function loadInfo() {
  fetch("/info", { headers: headers() })
    .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
    .then((info) => { $("#model").textContent = `model: ${info.model} (${info.device}/${info.dtype}, context ${info.context_length})`; })
    .catch((status) => {
      $("#model").textContent = status === 401 ? "model: enter the server's API key" : "model: (the server is not ready)";
    });
}
loadInfo();

// ---- forms -> request bodies ----
function body(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.value === "") continue;
    if (el.type === "number") out[el.name] = Number(el.value);
    else if (el.name === "constraint") out.constraint = { type: "json_schema", schema: jsonField(el) };
    else if (el.name === "stop" || el.name === "labels") out[el.name] = el.value.split(",").map((s) => s.trim()).filter(Boolean);
    else out[el.name] = el.value;
  }
  return out;
}

// A JSON text box: its value parsed, or an error that names the field (shown by the submit handler).
function jsonField(el) {
  try {
    return JSON.parse(el.value);
  } catch (err) {
    throw { field: el.name, message: `${el.name}: not valid JSON (${err.message})` };
  }
}

function clearErrors(form) {
  for (const e of form.querySelectorAll(".field-error")) e.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  form.querySelector(".errors").textContent = "";
}

// The API's error {"error": {"type", "message", "field"}} next to the field it names.
function showError(form, error) {
  const field = error.field ? error.field.split(".")[0] : null;
  const input = field ? form.querySelector(`[name="${field}"]`) : null;
  const text = error.message || String(error);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    const note = document.createElement("span");
    note.className = "field-error";
    note.setAttribute("role", "alert");
    note.id = `${form.id}-error-${field}`;
    note.textContent = text;
    input.setAttribute("aria-describedby", note.id);
    (input.closest("label") || input).after(note);
  } else {
    form.querySelector(".errors").textContent = text;
  }
}

async function failure(form, response) {
  let error = { message: `HTTP ${response.status}` };
  try { error = (await response.json()).error || error; } catch (_) { /* not JSON */ }
  showError(form, error);
}

function stats(el, parts) {
  el.textContent = parts.filter(Boolean).join(" · ");
}

// ---- Generate: streamed token by token, with Stop ----
let controller = null;
const genForm = $("#form-generate");
const genOut = $("#generate-output");
const genStats = $("#generate-stats");
const stopButton = $("#generate-stop");
stopButton.addEventListener("click", () => controller && controller.abort());

genForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  clearErrors(genForm);
  genOut.textContent = "";
  stats(genStats, ["…"]);
  controller = new AbortController();
  stopButton.disabled = false;
  const started = performance.now();
  let firstAt = null;
  let tokens = 0;
  let request;
  try {
    request = body(genForm);
  } catch (error) {  // a box that is not JSON: said next to it, nothing sent
    showError(genForm, error);
    stats(genStats, []);
    stopButton.disabled = true;
    return;
  }
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: headers(), body: JSON.stringify({ ...request, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) { await failure(genForm, response); stats(genStats, []); return; }
    const model = response.headers.get("x-textgen-model");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const event = JSON.parse(data);
        const elapsed = (performance.now() - started) / 1000;
        if (event.type === "token") {
          if (firstAt === null) firstAt = elapsed;
          tokens += 1;
          genOut.textContent += event.text;
          stats(genStats, [`model ${model}`, `${tokens} tokens`, `first token ${firstAt.toFixed(2)} s`]);
        } else if (event.type === "done") {
          const n = event.usage.completion_tokens;
          const rate = firstAt !== null && elapsed > firstAt ? (n - 1) / (elapsed - firstAt) : 0;
          stats(genStats, [`model ${event.model}`, `${n} tokens`, `first token ${(firstAt ?? elapsed).toFixed(2)} s`,
            `${rate.toFixed(1)} tokens/s`, `finish: ${event.generations[0].finish_reason}`,
            event.generations[0].constraint_complete === false ? "the JSON is incomplete (max_new_tokens)" : ""]);
        } else if (event.type === "error") {
          showError(genForm, event.error);
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stats(genStats, [`stopped after ${tokens} tokens`]);
    else showError(genForm, { message: String(err) });
  } finally {
    stopButton.disabled = true;
    controller = null;
  }
});

// ---- the task tabs: one JSON call each ----
async function call(form, render) {
  clearErrors(form);
  const statsEl = $(`#${form.id.replace("form-", "")}-stats`);
  stats(statsEl, ["…"]);
  const started = performance.now();
  try {
    const response = await fetch(form.dataset.endpoint, { method: "POST", headers: headers(), body: JSON.stringify(body(form)) });
    if (!response.ok) { await failure(form, response); stats(statsEl, []); return; }
    const answer = await response.json();
    render(answer);
    const seconds = (performance.now() - started) / 1000;
    const n = answer.usage ? answer.usage.completion_tokens : 0;
    const work = n ? `${n} tokens generated` : `${answer.usage.prompt_tokens} prompt tokens scored`;
    stats(statsEl, [`model ${answer.model}`, work,
      `${seconds.toFixed(2)} s`, n ? `${(n / seconds).toFixed(1)} tokens/s` : ""]);
  } catch (err) {
    showError(form, { message: String(err) });
  }
}

$("#form-translate").addEventListener("submit", (e) => {
  e.preventDefault();
  call(e.target, (a) => { $("#translate-output").textContent = a.translations[0]; });
});
$("#form-summarize").addEventListener("submit", (e) => {
  e.preventDefault();
  call(e.target, (a) => { $("#summarize-output").textContent = a.summaries[0]; });
});
$("#form-sentiment").addEventListener("submit", (e) => {
  e.preventDefault();
  call(e.target, (a) => {
    const result = a.results[0];
    const out = $("#sentiment-output");
    out.textContent = "";
    for (const [label, p] of Object.entries(result.scores)) {
      const row = document.createElement("div");
      row.className = "bar" + (label === result.label ? " top" : "");
      row.innerHTML = `<span class="label"></span><span class="track"><span class="fill"></span></span><span class="value"></span>`;
      row.querySelector(".label").textContent = label;
      row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
      row.querySelector(".value").textContent = p.toFixed(3);
      row.dataset.probability = String(p);
      row.setAttribute("role", "meter");
      row.setAttribute("aria-label", label);
      row.setAttribute("aria-valuemin", "0");
      row.setAttribute("aria-valuemax", "1");
      row.setAttribute("aria-valuenow", p.toFixed(3));
      out.appendChild(row);
    }
  });
});
