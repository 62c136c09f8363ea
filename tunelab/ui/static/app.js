// tunelab ui: live config checks, run watching, shipping jobs and the streaming chat.
// Text from the server goes into the page with textContent only, never as HTML.
"use strict";

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// --- configure: every change is checked by the server with the CLI's own validation ---
function setupConfigForm() {
  const form = document.getElementById("config-form");
  if (!form) return;
  const estimate = document.getElementById("estimate");
  const formError = document.getElementById("form-error");
  let latest = 0;
  const check = async () => {
    const asked = ++latest;
    const data = new FormData(form);
    data.delete("config_path"); data.delete("replace");
    const reply = await fetch("/api/config/check", { method: "POST", body: data });
    const result = await reply.json();
    if (asked !== latest) return; // a newer check is on its way: show only the last answer
    form.querySelectorAll(".field").forEach((field) => {
      const name = field.id.slice("field-".length);
      const message = result.errors[name] || "";
      field.classList.toggle("invalid", Boolean(message));
      document.getElementById("error-" + name).textContent = message;
    });
    formError.hidden = !result.errors[""];
    formError.textContent = result.errors[""] || "";
    estimate.textContent = result.estimate || "(fix the highlighted value to see the estimate)";
    form.dataset.checked = String(Number(form.dataset.checked || 0) + 1);
  };
  form.addEventListener("input", debounce(check, 300));
  form.addEventListener("change", debounce(check, 300));
  check();
}

// --- runs: poll the run folder's state and draw the curves ---
function polyline(svg, points, color, dashed, bounds) {
  const [x0, x1, y0, y1] = bounds;
  const sx = (x) => 30 + ((x - x0) / (x1 - x0 || 1)) * 380;
  const sy = (y) => 185 - ((y - y0) / (y1 - y0 || 1)) * 170;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", color);
  line.setAttribute("stroke-width", "2");
  if (dashed) line.setAttribute("stroke-dasharray", "5 3");
  svg.appendChild(line);
}

function chart(id, series) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const bounds = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  for (const s of series) if (s.points.length) polyline(svg, s.points, s.color, s.dashed, bounds);
  for (const [value, y] of [[bounds[3], 14], [bounds[2], 190]]) {
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    label.setAttribute("x", "2"); label.setAttribute("y", String(y)); label.setAttribute("font-size", "10");
    label.textContent = Number(value).toPrecision(3);
    svg.appendChild(label);
  }
  svg.dataset.points = String(all.length);
}

function fmt(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

function setupRun() {
  const box = document.getElementById("run");
  if (!box) return;
  const path = box.dataset.path;
  const query = "path=" + encodeURIComponent(path);
  const refresh = async () => {
    const run = await (await fetch("/api/run?" + query)).json();
    document.getElementById("state").textContent = run.state;
    document.getElementById("step").textContent = run.step;
    document.getElementById("total").textContent = run.total_steps || "?";
    document.getElementById("loss").textContent = fmt(run.loss, 4);
    document.getElementById("eval-loss").textContent = fmt(run.eval_loss, 4);
    document.getElementById("tps").textContent = fmt(run.tokens_per_second, 0);
    const progress = document.getElementById("progress");
    progress.value = run.total_steps ? run.step / run.total_steps : 0;
    document.getElementById("log").textContent = run.log;
    chart("chart-loss", [
      { points: run.curves.loss, color: "#1f77b4" },
      { points: run.curves.eval_loss, color: "#d62728", dashed: true },
    ]);
    chart("chart-lr", [{ points: run.curves.lr, color: "#2ca02c" }]);
    chart("chart-tps", [{ points: run.curves.tokens_per_second, color: "#ff7f0e" }]);
    document.getElementById("stop").disabled = run.state !== "running";
    document.getElementById("resume").disabled = run.state !== "stopped";
    box.dataset.state = run.state;
  };
  document.getElementById("stop").addEventListener("click", async () => {
    await fetch("/api/run/stop?" + query, { method: "POST" });
    refresh();
  });
  document.getElementById("resume").addEventListener("click", async () => {
    await fetch("/api/run/resume?" + query, { method: "POST" });
    refresh();
  });
  // one request at a time: on a busy machine a reply can take longer than the interval, and
  // overlapping polls would fill the browser's few connections to the app, so that a click's
  // request waited behind them
  const watch = async () => {
    try { await refresh(); } finally { setTimeout(watch, box.dataset.state === "running" ? 1000 : 3000); }
  };
  watch();

  const shipLog = document.getElementById("ship-log");
  const serveStatus = document.getElementById("serve-status");
  const serveStop = document.getElementById("serve-stop");
  const showServe = (job) => {
    if (!serveStatus) return;
    serveStatus.dataset.state = job.state;
    serveStop.disabled = job.state !== "running";
    if (job.state === "running" && job.listening) {
      // the address is ours (a port this app picked), but it goes in as text all the same
      serveStatus.replaceChildren("Serving at ");
      const link = document.createElement("a");
      link.id = "serve-address"; link.href = job.address; link.textContent = job.address;
      serveStatus.append(link, " (OpenAI-compatible; /v1/models lists the models)");
    } else {
      serveStatus.textContent = job.state === "running" ? "starting (loading the model)" : "not serving";
    }
  };
  const showEvalReport = async () => {
    const run = await (await fetch("/api/run?" + query)).json();
    if (!run.eval_report) return;
    // a new src each time, so a second evaluation's report replaces the first one's
    const src = "/files?path=" + encodeURIComponent(run.eval_report) + "&t=" + Date.now();
    document.getElementById("eval-report").href = src;
    document.getElementById("eval-frame").src = src;
    document.getElementById("eval-box").hidden = false;
  };
  const watchJob = (action) => {
    const poll = async () => {
      const job = await (await fetch(`/api/job?${query}&action=${action}`)).json();
      shipLog.textContent = `${action}: ${job.state}\n${job.log || ""}`;
      if (action === "serve") showServe(job);
      if (job.state === "running") { setTimeout(poll, 1000); return; } // after the reply
      if (action === "eval" && job.state === "done") await showEvalReport();
      shipLog.dataset.action = action;
      shipLog.dataset.state = job.state; // set last: the page is settled once this shows
    };
    setTimeout(poll, 1000);
  };
  document.querySelectorAll("button.ship").forEach((button) => {
    button.addEventListener("click", async () => {
      const action = button.dataset.action;
      let extra = "";
      const limit = document.getElementById("eval-limit");
      if (action === "eval" && limit && limit.value) extra = "&limit=" + encodeURIComponent(limit.value);
      delete shipLog.dataset.state;
      const reply = await fetch(`/api/ship?${query}&action=${action}${extra}`, { method: "POST" });
      const started = await reply.json();
      if (!reply.ok) {
        shipLog.textContent = `${action}: ${started.error}`;
        shipLog.dataset.action = action;
        shipLog.dataset.state = "refused";
        return;
      }
      shipLog.textContent = `running: tunelab ${started.started}`;
      watchJob(action);
    });
  });
  if (serveStop) {
    serveStop.addEventListener("click", async () => {
      await fetch(`/api/ship/stop?${query}&action=serve`, { method: "POST" });
    });
    if (serveStatus.dataset.address) watchJob("serve"); // a server started before this page
  }
}

// --- chat: the same prompt to base and tuned, both streamed ---
async function stream(model, path, prompt, maxNewTokens) {
  const out = document.getElementById("answer-" + model);
  out.textContent = ""; out.dataset.done = "false";
  const reply = await fetch("/api/chat", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ path, prompt, model, max_new_tokens: maxNewTokens }),
  });
  if (!reply.ok) { out.textContent = "error: " + (await reply.json()).error; out.dataset.done = "true"; return; }
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    out.textContent += decoder.decode(value, { stream: true });
  }
  out.dataset.blank = String(!out.textContent.trim());
  out.dataset.done = "true";
}

function setupChat() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const path = document.getElementById("chat-run").value;
    const prompt = document.getElementById("chat-prompt").value;
    const max = Number(document.getElementById("chat-max").value) || 64;
    stream("base", path, prompt, max);
    stream("tuned", path, prompt, max);
  });
}

// --- data: an upload over the app's limit is refused here, before it is sent (the server
// refuses it too, with the same message) ---
function setupUpload() {
  const input = document.getElementById("data-upload");
  if (!input) return;
  const limitMb = Number(input.dataset.maxMb);
  input.form.addEventListener("submit", (event) => {
    const file = input.files[0];
    if (!file || file.size <= limitMb * 1048576) return;
    event.preventDefault();
    const error = document.getElementById("upload-error");
    error.textContent = `error: the upload is larger than this app's limit of ${limitMb} MiB. ` +
      "Type the file's path instead (files in the opened folders are read where they are), " +
      "or start the app with a larger limit: tunelab ui --max-upload-mb N.";
    error.hidden = false;
  });
}

setupConfigForm();
setupUpload();
setupRun();
setupChat();
