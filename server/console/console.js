// loraserve's operator console: one page over the server's own routes.
//
// Reads /v1/status once a second (the pool, the queue, the adapters, the plan), /v1/models
// for the playground, and with the admin key the composition jobs. Every figure on the page
// is one of those routes' numbers or a difference of two polls (rates). The key lives in
// this tab's session storage only. No library: the charts are drawn on canvases here.
"use strict";

const KEY_STORAGE = "loraserve.key";
const POLL_MS = 1000;
const JOBS_POLL_MS = 2000;
const MODELS_POLL_MS = 10000;
const HISTORY = 300; // samples kept for the charts (five minutes at one a second)
const MIN_WINDOW_S = 30; // the charts' time axis spans at least this much
const MAX_PLAYGROUND_DEFAULT = 8; // models ticked by default in the playground

// What the page knows; tests read it (window.consoleState).
const state = {
  key: "",
  admin: false,
  status: null, // the last /v1/status body
  samples: [], // {t, kv, adapter, cached, free, tokensPerSecond, running, waiting}
  adapterRates: new Map(), // adapter name -> tokens per second (smoothed)
  models: [], // ids from /v1/models, the base first
  ticked: new Map(), // playground model id -> ticked (the first listing's first few are)
  modelsListed: false,
  jobs: [],
  timers: [],
};
window.consoleState = state;

const $ = (id) => document.getElementById(id);

class APIError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(json) {
  const h = {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, body) {
  const init = body === undefined
    ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  return readJSON(response);
}

async function readJSON(response) {
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new APIError(response.status, error.message || text || response.statusText, error.code);
  }
  return data;
}

// ---------------------------------------------------------------------------------------
// Formatting.

function fmtInt(n) {
  return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US");
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}

function fmtRate(r) {
  return r === undefined || r === null ? "–" : r.toFixed(1);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fillTable(table, rows) {
  table.replaceChildren(
    ...rows.map((row) => {
      if (typeof row === "string") return el("tr", {}, el("th", { colspan: 3 }, row));
      return el("tr", {}, ...row.map((cell, i) => el("td", i ? { class: "num" } : {}, cell)));
    }),
  );
}

// ---------------------------------------------------------------------------------------
// Charts.

function canvasContext(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = Math.round((width * canvas.getAttribute("height")) / canvas.getAttribute("width"));
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

const PAD = { left: 56, right: 40, top: 8, bottom: 18 };

// Grid lines, the left axis' labels up to yMax, and (given rightMax) a right axis' too.
function axes(ctx, width, height, yMax, yLabel, seconds, rightMax) {
  ctx.strokeStyle = "#d1d5db";
  ctx.fillStyle = "#6b7280";
  ctx.lineWidth = 1;
  const plotH = height - PAD.top - PAD.bottom;
  for (let i = 0; i <= 4; i += 1) {
    const y = PAD.top + plotH - (plotH * i) / 4;
    ctx.beginPath();
    ctx.moveTo(PAD.left, y + 0.5);
    ctx.lineTo(width - PAD.right, y + 0.5);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(fmtInt((yMax * i) / 4), PAD.left - 4, y + 4);
    if (rightMax !== undefined) {
      ctx.textAlign = "left";
      ctx.fillText(String(+((rightMax * i) / 4).toFixed(1)), width - PAD.right + 4, y + 4);
    }
  }
  ctx.textAlign = "left";
  ctx.fillText(yLabel, 2, PAD.top + 8);
  ctx.textAlign = "right";
  ctx.fillText("now", width - PAD.right, height - 4);
  ctx.textAlign = "left";
  ctx.fillText(`${Math.round(seconds)} s ago`, PAD.left, height - 4);
}

// The charts' time axis: the newest sample at the right edge, at least MIN_WINDOW_S wide.
function timeAxis(width) {
  const samples = state.samples;
  const now = samples.length ? samples[samples.length - 1].t : 0;
  const spanS = Math.max(MIN_WINDOW_S, samples.length ? now - samples[0].t : 0);
  const plotW = width - PAD.left - PAD.right;
  return { spanS, x: (t) => PAD.left + plotW * (1 - (now - t) / spanS) };
}

// A round number at or above n, for an axis' top.
function niceCeil(n) {
  const step = 10 ** Math.floor(Math.log10(n));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= n) return m * step;
  return 10 * step;
}

function clipToPlot(ctx, width, height) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(PAD.left, PAD.top, width - PAD.left - PAD.right, height - PAD.top - PAD.bottom);
  ctx.clip();
}

// The pool, stacked: KV, adapters, cached prefixes, free. Zoomed (the default), the axis
// ends a little above the most pages in use, so a big pool's few busy pages still show.
function drawPool() {
  const { ctx, width, height } = canvasContext($("pool-chart"));
  const samples = state.samples;
  const total = state.status ? state.status.pool.num_pages : 1;
  const used = Math.max(1, ...samples.map((s) => s.kv + s.adapter + s.cached));
  const top = $("pool-zoom").checked ? Math.min(total, niceCeil(used * 1.2)) : total;
  const { spanS, x } = timeAxis(width);
  axes(ctx, width, height, top, "pages", spanS);
  if (!samples.length) return;
  const plotH = height - PAD.top - PAD.bottom;
  const y = (v) => PAD.top + plotH - (plotH * v) / top;
  clipToPlot(ctx, width, height);
  const layers = [
    ["kv", "--kv"],
    ["adapter", "--adapter"],
    ["cached", "--cached"],
    ["free", "--free"],
  ];
  const below = samples.map(() => 0);
  for (const [field, color] of layers) {
    const above = samples.map((s, i) => below[i] + s[field]);
    ctx.beginPath();
    samples.forEach((s, i) => ctx.lineTo(x(s.t), y(above[i])));
    for (let i = samples.length - 1; i >= 0; i -= 1) ctx.lineTo(x(samples[i].t), y(below[i]));
    ctx.closePath();
    ctx.fillStyle = cssColor(color);
    ctx.fill();
    above.forEach((v, i) => { below[i] = v; });
  }
  ctx.restore();
}

function drawLines(canvas, series, yLabel, yMax, rightMax) {
  const { ctx, width, height } = canvasContext(canvas);
  const samples = state.samples;
  const { spanS, x } = timeAxis(width);
  axes(ctx, width, height, yMax, yLabel, spanS, rightMax);
  const plotH = height - PAD.top - PAD.bottom;
  for (const { field, color, scale } of series) {
    ctx.beginPath();
    samples.forEach((s) => {
      const v = Math.min(s[field] / scale, 1);
      ctx.lineTo(x(s.t), PAD.top + plotH - plotH * v);
    });
    ctx.strokeStyle = cssColor(color);
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }
}

function drawRates() {
  const samples = state.samples;
  const maxRate = niceCeil(Math.max(1, ...samples.map((s) => s.tokensPerSecond)));
  const maxQueue = niceCeil(Math.max(1, ...samples.map((s) => Math.max(s.running, s.waiting))));
  drawLines(
    $("rate-chart"),
    [
      { field: "tokensPerSecond", color: "--tok", scale: maxRate },
      { field: "running", color: "--running", scale: maxQueue },
      { field: "waiting", color: "--waiting", scale: maxQueue },
    ],
    "tok/s",
    maxRate,
    maxQueue,
  );
}

function drawLoss(canvas, losses) {
  const { ctx, width, height } = canvasContext(canvas);
  if (!losses.length) return;
  const lo = Math.min(...losses);
  const hi = Math.max(...losses);
  const range = hi - lo || 1;
  const plotH = height - PAD.top - PAD.bottom;
  const plotW = width - PAD.left - PAD.right;
  const x = (i) => PAD.left + (losses.length === 1 ? plotW : (plotW * i) / (losses.length - 1));
  const y = (v) => PAD.top + plotH - (plotH * (v - lo)) / range;
  ctx.fillStyle = "#6b7280";
  ctx.textAlign = "right";
  ctx.fillText(hi.toFixed(3), PAD.left - 4, PAD.top + 8);
  ctx.fillText(lo.toFixed(3), PAD.left - 4, PAD.top + plotH);
  ctx.textAlign = "left";
  ctx.fillText(`${losses.length} evaluations`, PAD.left, height - 4);
  ctx.beginPath();
  losses.forEach((v, i) => ctx.lineTo(x(i), y(v)));
  ctx.strokeStyle = cssColor("--tok");
  ctx.lineWidth = 1;
  ctx.stroke();
  let best = Infinity;
  ctx.beginPath();
  losses.forEach((v, i) => {
    best = Math.min(best, v);
    ctx.lineTo(x(i), y(best));
  });
  ctx.strokeStyle = cssColor("--cached");
  ctx.lineWidth = 2;
  ctx.stroke();
}

function legend(list, items) {
  list.replaceChildren(...items.map(([cls, text]) => el("li", { class: cls, id: `legend-${cls}` }, text)));
}

// ---------------------------------------------------------------------------------------
// The status poll.

function record(status) {
  const previous = state.status;
  const dt = previous ? status.time - previous.time : 0;
  let tokensPerSecond = 0;
  if (previous && dt > 0) {
    tokensPerSecond = Math.max(
      0, (status.requests.generation_tokens - previous.requests.generation_tokens) / dt);
    const before = new Map(previous.adapters.map((a) => [a.name, a.generated_tokens]));
    before.set("", previous.base.generated_tokens);
    const now = status.adapters.map((a) => [a.name, a.generated_tokens]);
    now.push(["", status.base.generated_tokens]);
    for (const [name, tokens] of now) {
      const rate = before.has(name) ? Math.max(0, (tokens - before.get(name)) / dt) : 0;
      const old = state.adapterRates.get(name);
      state.adapterRates.set(name, old === undefined ? rate : 0.5 * old + 0.5 * rate);
    }
  }
  const p = status.pool;
  state.samples.push({
    t: status.time,
    kv: p.kv,
    adapter: p.adapter,
    cached: p.cached,
    free: p.free,
    tokensPerSecond,
    running: status.requests.running,
    waiting: status.requests.waiting,
  });
  if (state.samples.length > HISTORY) state.samples.shift();
  state.status = status;
}

function render() {
  const s = state.status;
  $("model-name").textContent = s.model;
  const p = s.pool;
  $("pool-total").textContent = `${fmtInt(p.num_pages)} pages × ${fmtBytes(p.page_bytes)} = ${fmtBytes(p.num_pages * p.page_bytes)}`;
  drawPool();
  legend($("pool-legend"), [
    ["kv", `KV of requests ${fmtInt(p.kv)}`],
    ["adapter", `adapters ${fmtInt(p.adapter)}`],
    ["cached", `cached prefixes ${fmtInt(p.cached)}`],
    ["free", `free ${fmtInt(p.free)}`],
  ]);
  const last = state.samples[state.samples.length - 1];
  drawRates();
  legend($("rate-legend"), [
    ["tok", `generated tok/s ${fmtRate(last.tokensPerSecond)}`],
    ["running", `running ${s.requests.running}`],
    ["waiting", `waiting ${s.requests.waiting} (requests: right axis)`],
  ]);
  renderPlan(s);
  renderCounters(s);
  renderAdapters(s);
}

function renderPlan(s) {
  const plan = s.plan;
  const p = s.pool;
  const rows = [["", "plan", "live"]];
  if (plan) {
    rows.push(
      ["pool pages", `${fmtInt(plan.pool.num_pages)} (${plan.pool.source})`, fmtInt(p.num_pages)],
      ["page bytes", fmtBytes(plan.pool.page_bytes), fmtBytes(p.page_bytes)],
      ["weights", `${fmtBytes(plan.weights.bytes)} · ${plan.weights.bits_per_param.toFixed(2)} bit/param`, ""],
      ["KV per token", fmtBytes(plan.kv.bytes_per_token), ""],
      ["tokens of KV, no adapters", fmtInt(plan.kv.tokens_if_only_kv), ""],
    );
  } else {
    rows.push(["pool pages", "(no plan)", fmtInt(p.num_pages)]);
  }
  rows.push(
    ["tokens of KV beside resident adapters", "", fmtInt(p.token_capacity)],
    ["tokens of KV in use", "", fmtInt(p.kv / 2)],
    ["adapter pages", "", fmtInt(p.adapter)],
  );
  if (plan) {
    rows.push(`an adapter on every linear layer (plan) · context ${fmtInt(plan.max_model_len)}, ${plan.max_num_seqs} sequences`);
    for (const a of plan.adapters) {
      const most = a.fits.length ? a.fits[a.fits.length - 1] : null;
      const fit = most ? `${fmtInt(most.adapters)} beside ${fmtInt(most.tokens)} tokens` : "none fit";
      rows.push([`${a.name}: ${fmtInt(a.pages)} pages`, fit, ""]);
    }
  }
  fillTable($("plan-table"), rows);
}

function renderCounters(s) {
  const r = s.requests;
  const a = s.adapter_counters;
  const prefetch = a.prefetch_hits + a.prefetch_misses;
  const prefix = s.prefix_cache.queries;
  fillTable($("counters"), [
    ["running · waiting", `${r.running} · ${r.waiting}`],
    ["preemptions", fmtInt(r.preemptions)],
    ["steps (failed)", `${fmtInt(r.steps)} (${fmtInt(r.failed_steps)})`],
    ["prompt · generated tokens", `${fmtInt(r.prompt_tokens)} · ${fmtInt(r.generation_tokens)}`],
    ["adapters loaded · resident · pinned", `${a.loaded} · ${a.resident} · ${a.pinned}`],
    ["prefetch hits · misses", `${fmtInt(a.prefetch_hits)} · ${fmtInt(a.prefetch_misses)}` +
      (prefetch ? ` (${((100 * a.prefetch_hits) / prefetch).toFixed(0)}% hits)` : "")],
    ["loads · evictions", `${fmtInt(a.loads)} · ${fmtInt(a.evictions)} (${fmtSeconds(a.load_seconds)} reading)`],
    ["prefix cache hits", prefix ? `${((100 * s.prefix_cache.hits) / prefix).toFixed(0)}% of ${fmtInt(prefix)} tokens` : "–"],
  ]);
}

function renderAdapters(s) {
  const rows = [];
  const base = s.base;
  rows.push(el("tr", { class: "base", dataset: { name: s.model } },
    el("td", {}, s.model), el("td", {}, "base"), el("td", {}, "–"), el("td", {}, ""),
    el("td", {}, ""), el("td", {}, ""), el("td", {}, ""), el("td", {}, ""), el("td", {}, ""),
    el("td", { class: "num" }, fmtSeconds(base.ttft_mean_seconds)),
    el("td", { class: "num" }, fmtRate(state.adapterRates.get(""))),
    el("td", { class: "num" }, fmtInt(base.requests_finished)),
    adminCell(null)));
  for (const a of s.adapters) {
    const others = a.count !== undefined;
    const tier = others
      ? Object.entries(a.tiers).filter(([, n]) => n).map(([t, n]) => `${n} ${t}`).join(", ")
      : a.tier;
    rows.push(el("tr", { dataset: { name: a.name } },
      el("td", {}, others ? `${a.name} (${a.count})` : a.name),
      el("td", {}, others ? "" : a.kind),
      el("td", { class: others ? "" : `tier-${a.tier}` }, tier),
      el("td", {}, others ? (a.pinned ? String(a.pinned) : "") : (a.pinned ? "pinned" : "")),
      el("td", { class: "num" }, others ? "" : a.version),
      el("td", { class: "num" }, others ? "" : a.rank),
      el("td", { class: "num" }, fmtInt(a.pages)),
      el("td", { class: "num" }, a.running),
      el("td", { class: "num" }, a.waiting),
      el("td", { class: "num" }, fmtSeconds(a.ttft_mean_seconds)),
      el("td", { class: "num" }, fmtRate(state.adapterRates.get(a.name))),
      el("td", { class: "num" }, fmtInt(a.requests_finished)),
      adminCell(others ? null : a)));
  }
  $("adapters").tBodies[0].replaceChildren(...rows);
}

function adminCell(adapter) {
  if (!state.admin) return null;
  if (!adapter) return el("td", {});
  return el("td", {},
    el("button", { type: "button", class: "small", onclick: () => unload(adapter.name) }, "unload"),
    " ",
    el("button", { type: "button", class: "small", onclick: () => preparePin(adapter.name) },
      adapter.pinned ? "reload" : "pin…"));
}

// ---------------------------------------------------------------------------------------
// Admin actions: the API's own routes.

async function unload(name) {
  try {
    await api("/v1/unload_lora_adapter", { lora_name: name });
    $("admin-result").textContent = `unloaded ${name}`;
    refreshModels();
  } catch (e) {
    $("admin-result").textContent = `unload ${name}: ${e.message}`;
  }
}

function preparePin(name) {
  $("load-name").value = name;
  $("load-pinned").checked = true;
  $("load-in-place").checked = true;
  $("admin-result").textContent = `give ${name}'s path, then Load: it is reloaded in place, pinned`;
  $("load-path").focus();
}

async function submitLoad(event) {
  event.preventDefault();
  const body = {
    lora_name: $("load-name").value.trim(),
    lora_path: $("load-path").value.trim(),
    pinned: $("load-pinned").checked,
    in_place: $("load-in-place").checked,
  };
  try {
    const reply = await api("/v1/load_lora_adapter", body);
    $("admin-result").textContent = reply.message;
    refreshModels();
  } catch (e) {
    $("admin-result").textContent = `load ${body.lora_name}: ${e.message}`;
  }
}

async function pollJobs() {
  if (!state.admin) return;
  try {
    const reply = await api("/v1/adapters/compose");
    state.jobs = reply.data;
    renderJobs();
  } catch (e) {
    showBanner(`compositions: ${e.message}`);
  }
}

function renderJobs() {
  const box = $("compositions");
  if (!state.jobs.length) {
    box.replaceChildren(el("p", { class: "muted" }, "none yet"));
    return;
  }
  box.replaceChildren(...state.jobs.map((job) => {
    const canvas = el("canvas", { width: 480, height: 120, "aria-label": `loss of ${job.name}` });
    const best = job.best_loss === null ? "–" : job.best_loss.toFixed(4);
    const node = el("div", { class: "job", dataset: { job: job.id } },
      el("div", {}, el("strong", {}, job.name), ` · ${job.method} · ${job.status} · step ${job.step}/${job.max_steps} · best loss ${best}`,
        job.error ? el("span", { class: "error" }, ` · ${job.error}`) : null),
      canvas);
    requestAnimationFrame(() => drawLoss(canvas, job.loss_history));
    return node;
  }));
}

// ---------------------------------------------------------------------------------------
// The playground: one prompt, streamed from several models side by side.

async function refreshModels() {
  try {
    const reply = await api("/v1/models");
    const base = state.status ? state.status.model : null;
    const ids = reply.data.map((m) => m.id);
    ids.sort((a, b) => (a === base ? -1 : b === base ? 1 : a.localeCompare(b)));
    state.models = ids;
    const box = $("pg-models");
    box.replaceChildren(...ids.map((id, i) => {
      if (!state.ticked.has(id)) state.ticked.set(id, !state.modelsListed && i < MAX_PLAYGROUND_DEFAULT);
      const input = el("input", { type: "checkbox", value: id, dataset: { model: id } });
      input.checked = state.ticked.get(id);
      input.addEventListener("change", () => state.ticked.set(id, input.checked));
      return el("label", {}, input, " ", id === base ? `${id} (base)` : id);
    }));
    state.modelsListed = true;
  } catch (e) {
    showBanner(`models: ${e.message}`);
  }
}

function sampling() {
  return {
    max_tokens: Number($("pg-max-tokens").value),
    temperature: Number($("pg-temperature").value),
    top_p: Number($("pg-top-p").value),
    seed: Number($("pg-seed").value),
  };
}

async function runPlayground(event) {
  event.preventDefault();
  const prompt = $("pg-prompt").value;
  const settings = sampling();
  const models = state.models.filter((id) => state.ticked.get(id));
  const shown = Object.entries(settings).map(([k, v]) => `${k} ${v}`).join(" · ");
  const cards = models.map((model) => {
    const text = el("pre", {});
    const meta = el("div", { class: "meta" }, shown);
    const card = el("div", { class: "output", dataset: { model, state: "running" } },
      el("h4", {}, model), text, meta);
    return { model, card, text, meta };
  });
  $("pg-outputs").replaceChildren(...cards.map((c) => c.card));
  $("pg-run").disabled = true;
  await Promise.all(cards.map((c) => stream(c, prompt, settings, shown)));
  $("pg-run").disabled = false;
}

async function stream(card, prompt, settings, shown) {
  const started = performance.now();
  let first = null;
  let finish = null;
  let usage = null;
  let done = false; // the stream's own end ("data: [DONE]"), not merely a closed connection
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({
        model: card.model, prompt, stream: true, stream_options: { include_usage: true }, ...settings,
      }),
    });
    if (!response.ok) await readJSON(response); // throws the envelope's message
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done: closed } = await reader.read();
      if (closed) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") {
            done = true;
            continue;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new APIError(500, chunk.error.message, chunk.error.code);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.text) {
              if (first === null) first = performance.now();
              card.text.textContent += choice.text;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    if (!done) throw new Error("the stream ended early");
    const ttft = first === null ? "–" : fmtSeconds((first - started) / 1000);
    const tokens = usage ? usage.completion_tokens : "?";
    card.meta.textContent = `${shown} · ${tokens} tokens · first ${ttft} · ${finish || "?"}`;
    card.card.dataset.state = "done";
  } catch (e) {
    card.meta.replaceChildren(el("span", { class: "error" }, e.message));
    card.card.dataset.state = "error";
  }
}

// ---------------------------------------------------------------------------------------
// Key, polling, start.

function showBanner(message) {
  const banner = $("error-banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function stopPolling() {
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
}

function showKey(message) {
  stopPolling();
  state.status = null;
  state.samples = [];
  state.adapterRates.clear();
  state.jobs = [];
  $("dashboard").hidden = true;
  $("adapters").tBodies[0].replaceChildren();
  $("pg-outputs").replaceChildren();
  $("key-panel").hidden = false;
  $("key-error").textContent = message;
  $("access").textContent = "";
  $("change-key").hidden = true;
  $("key-input").focus();
}

async function poll() {
  try {
    const status = await api("/v1/status");
    record(status);
    render();
    showBanner("");
  } catch (e) {
    if (e.status === 401) showKey(`The server refused the key: ${e.message}`);
    else showBanner(`status: ${e.message}`);
  }
}

async function pollHealth() {
  const badge = $("health");
  try {
    const response = await fetch("/health");
    const body = await response.json();
    badge.textContent = response.ok ? "healthy" : `unhealthy: ${body.error ? body.error.message : ""}`;
    badge.className = "badge " + (response.ok ? "ok" : "bad");
  } catch (_) {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

async function connect() {
  let status;
  try {
    status = await api("/v1/status");
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      showKey(state.key ? `The server refused this key: ${e.message}` : "");
    } else {
      showKey(`The server did not answer: ${e.message}`);
    }
    return;
  }
  state.admin = Boolean(status.access && status.access.admin);
  $("key-panel").hidden = true;
  $("dashboard").hidden = false;
  // Always there: a server with only an admin key serves data without one, and the admin
  // actions need it.
  $("change-key").hidden = false;
  $("change-key").textContent = state.key ? "change key" : "enter a key";
  $("access").textContent = state.admin ? "admin" : "user";
  $("access").className = "badge" + (state.admin ? " admin" : "");
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = !state.admin;
  record(status);
  render();
  pollHealth();
  await refreshModels();
  state.timers.push(setInterval(poll, POLL_MS), setInterval(pollHealth, 5 * POLL_MS));
  state.timers.push(setInterval(refreshModels, MODELS_POLL_MS));
  if (state.admin) {
    pollJobs();
    state.timers.push(setInterval(pollJobs, JOBS_POLL_MS));
  }
}

function start() {
  const meta = document.querySelector('meta[name="loraserve-key-required"]');
  const keyRequired = meta && meta.content === "1";
  state.key = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    $("key-input").value = "";
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-error").textContent = "";
    connect();
  });
  $("change-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = "";
    showKey("");
  });
  $("load-form").addEventListener("submit", submitLoad);
  $("pg-form").addEventListener("submit", runPlayground);
  window.addEventListener("resize", () => state.status && render());
  $("pool-zoom").addEventListener("change", () => state.status && drawPool());
  if (keyRequired && !state.key) showKey("");
  else connect();
}

start();
