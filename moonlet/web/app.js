// moonlet chat page: plain JS, no build step. Talks to the same server's /v1/chat/completions with SSE,
// shows streamed reasoning in a collapsible block, tool calls and their results, and sends the assistant's
// reasoning back with its tool calls (K2 needs it inside a tool-calling episode).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], model: null, abort: null };

// Tools that run in the browser, so tool calls can be tried without any server-side tool runtime.
const TOOLS = {
  calculator: {
    spec: { type: "function", function: { name: "calculator", description: "Evaluate an arithmetic expression.",
      parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] } } },
    run: ({ expression }) => {
      const e = String(expression ?? "");
      if (!/^[0-9+\-*/().%^\s eE]*$/.test(e)) throw new Error("only numbers and + - * / % ^ ( ) are allowed");
      return String(Function(`"use strict"; return (${e.replace(/\^/g, "**")});`)());
    },
  },
  current_time: {
    spec: { type: "function", function: { name: "current_time", description: "The current date and time (ISO 8601).",
      parameters: { type: "object", properties: {} } } },
    run: () => new Date().toISOString(),
  },
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// at most once a frame: a layout per streamed token made a long reply quadratic (8k tokens: 10 s)
let scrollPending = false;
function scrollDown() {
  if (scrollPending) return;
  scrollPending = true;
  requestAnimationFrame(() => { scrollPending = false; $("messages").scrollTop = $("messages").scrollHeight; });
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error?.message || r.statusText);
    state.model = j.data[0].id;
    $("model").textContent = `${state.model} · context ${j.data[0].max_model_len} tokens`;
  } catch (err) {
    $("model").textContent = `model list unavailable: ${err.message}`;
  }
}

function settings() {
  const num = (id, int) => { const v = $(id).value.trim(); return v === "" ? undefined : (int ? parseInt(v, 10) : parseFloat(v)); };
  const body = { temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens", true),
                 max_thinking_tokens: num("max_thinking_tokens", true), seed: num("seed", true) };
  for (const k of Object.keys(body)) if (body[k] === undefined || Number.isNaN(body[k])) delete body[k];
  return body;
}

function addUser(text) {
  const m = el("div", "msg user", text);
  $("messages").appendChild(m);
  scrollDown();
}

// One assistant bubble, filled from stream deltas.
function assistantView() {
  const root = el("div", "msg assistant");
  const think = el("details", "reasoning");
  think.open = true;
  const summary = el("summary", null, "Thinking…");
  const thinkText = el("div", "text");
  think.append(summary, thinkText);
  think.hidden = true;
  const content = el("div", "content");
  const calls = el("div", "calls");
  const stats = el("div", "stats");
  root.append(think, content, calls, stats);
  $("messages").appendChild(root);
  return { root, think, summary, thinkText, content, calls, stats, callEls: [] };
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

// Stream one assistant turn; returns the assistant message (OpenAI-shaped) and its finish reason.
async function streamTurn(view) {
  const tools = $("tools").checked ? Object.values(TOOLS).map((t) => t.spec) : undefined;
  const sys = $("system").value.trim();
  const messages = sys ? [{ role: "system", content: sys }, ...state.messages] : state.messages;
  const body = { model: state.model || undefined, messages, stream: true, stream_options: { include_usage: true },
                 ...settings() };
  if (tools) body.tools = tools;
  state.abort = new AbortController();
  const t0 = performance.now();
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                  signal: state.abort.signal });
  if (!r.ok) {
    const j = await r.json().catch(() => ({}));
    throw new Error(j.error?.message || `HTTP ${r.status}`);
  }
  const msg = { role: "assistant", content: "", reasoning_content: "", tool_calls: [] };
  view.msg = msg;  // what a Stop keeps of the turn
  let finish = null, tThinkEnd = null;
  for await (const data of sseEvents(r)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.usage) {
      const u = chunk.usage;
      view.stats.textContent = `${u.prompt_tokens} prompt (${u.prompt_tokens_details?.cached_tokens ?? 0} cached) · ` +
        `${u.completion_tokens} completion (${u.completion_tokens_details?.reasoning_tokens ?? 0} reasoning) · ` +
        `${((performance.now() - t0) / 1000).toFixed(1)} s`;
    }
    for (const ch of chunk.choices || []) {
      const d = ch.delta || {};
      const reasoning = d.reasoning_content ?? d.reasoning;
      if (reasoning) {
        view.think.hidden = false;
        msg.reasoning_content += reasoning;
        view.thinkText.append(reasoning);  // a text node per delta: no re-render of the whole reply
      }
      if (d.content) {
        if (tThinkEnd === null) tThinkEnd = performance.now();
        msg.content += d.content;
        view.content.append(d.content);
      }
      for (const tc of d.tool_calls || []) {
        if (tc.id) {
          msg.tool_calls[tc.index] = { id: tc.id, type: "function", function: { name: tc.function.name, arguments: "" } };
          view.callEls[tc.index] = el("div", "toolcall");
          view.calls.appendChild(view.callEls[tc.index]);
        }
        const call = msg.tool_calls[tc.index];
        call.function.arguments += tc.function?.arguments || "";
        view.callEls[tc.index].textContent = `→ ${call.function.name}(${call.function.arguments})`;
      }
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    scrollDown();
  }
  if (msg.reasoning_content) {
    const secs = (((tThinkEnd ?? performance.now()) - t0) / 1000).toFixed(1);
    view.summary.textContent = tThinkEnd === null && !msg.tool_calls.length ? `Thinking (${secs} s, unfinished)`
                                                                            : `Thought for ${secs} s`;
    view.think.open = !msg.content && !msg.tool_calls.length;  // collapse once there is an answer to read
  }
  if (finish === "length") view.stats.prepend(el("span", "note", "stopped at max tokens · "));
  if (!msg.tool_calls.length) delete msg.tool_calls;
  return { msg, finish };
}

function runTool(call) {
  const tool = TOOLS[call.function.name];
  if (!tool) return `error: unknown tool ${call.function.name}`;
  try {
    return tool.run(JSON.parse(call.function.arguments || "{}"));
  } catch (err) {
    return `error: ${err.message}`;
  }
}

async function send(text) {
  const convo = state.messages;  // Clear replaces it: a stopped turn must not write into the new one
  convo.push({ role: "user", content: text });
  addUser(text);
  $("send").disabled = true;
  $("stop").disabled = false;
  let view = null;
  try {
    for (let round = 0; round < 8; round++) {
      view = assistantView();
      const { msg, finish } = await streamTurn(view);
      convo.push(msg);  // reasoning_content goes back with the tool calls
      if (finish !== "tool_calls" || !msg.tool_calls || !$("tools").checked) break;
      for (const call of msg.tool_calls) {
        const result = runTool(call);
        view.calls.appendChild(el("div", "toolresult", `← ${call.function.name}: ${result}`));
        convo.push({ role: "tool", tool_call_id: call.id, content: result });
      }
      scrollDown();
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      $("messages").appendChild(el("div", "msg error", `Error: ${err.message}`));
    } else if (view?.msg && state.messages === convo) {  // Stop: keep what the user saw, as the model's turn
      const { role, content, reasoning_content } = view.msg;
      if (content || reasoning_content) convo.push({ role, content, reasoning_content });
      view.summary.textContent = "Thinking (stopped)";
      view.think.open = false;
      view.stats.prepend(el("span", "note", "stopped · "));
    }
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    state.abort = null;
    scrollDown();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || $("send").disabled) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.abort?.abort());
// clearing stops the turn in flight too: its later rounds would write into the new, empty conversation
$("clear").addEventListener("click", () => { state.abort?.abort(); state.messages = []; $("messages").replaceChildren(); });
$("api_key").addEventListener("change", () => { localStorage.setItem("moonlet_api_key", $("api_key").value); loadModel(); });
$("api_key").value = localStorage.getItem("moonlet_api_key") || "";
loadModel();
