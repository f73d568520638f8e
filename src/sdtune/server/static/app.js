// sdtune web UI: plain JavaScript, no build step. Talks only to the server's own API: A1111's /sdapi/v1 for
// generation and sdtune's /sdtune/v1 for training, datasets and helpers.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADERS = { "Content-Type": "application/json", "X-Sdtune-UI": "1" };
let lastSeed = null;
let lastPngParams = null;
let schema = null;
let currentRun = null;
let cards = { lora: [], hypernetwork: [], embedding: [] };
let cardKind = "lora";

async function api(path, options = {}) {
  const response = await fetch(path, { headers: HEADERS, ...options });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  if (!response.ok) {
    const message = body && (body.errors || body.detail) ? (typeof body.errors === "string" ? body.errors : JSON.stringify(body.detail)) : text;
    throw new Error(message || `HTTP ${response.status}`);
  }
  return body;
}
const post = (path, data, method = "POST") => api(path, { method, body: JSON.stringify(data) });

function showError(id, error) {
  const el = $(id);
  el.hidden = !error;
  el.textContent = error ? String(error.message || error) : "";
}

// ---------------------------------------------------------------------------------------------------- tabs
function showTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === `page-${name}`));
  if (name === "runs") loadRuns();
}
document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));

// ---------------------------------------------------------------------------------------------------- generate
async function loadModels() {
  const [models, vaes, samplers, options] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/sd-vae"), api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
  const fill = (select, items, keep) => {
    const old = select.value;
    select.innerHTML = keep;
    for (const [value, label] of items) select.add(new Option(label, value));
    if ([...select.options].some((o) => o.value === old)) select.value = old;
  };
  fill($("checkpoint"), models.map((m) => [m.model_name, m.title]), "");
  fill($("refiner"), models.map((m) => [m.model_name, m.title]), '<option value="">none</option>');
  fill($("vae"), vaes.map((v) => [v.model_name, v.model_name]), '<option value="Automatic">Automatic</option>');
  fill($("sampler"), samplers.map((s) => [s.name, s.name]), "");
  $("checkpoint").value = options.sd_model_checkpoint;
  $("vae").value = options.sd_vae || "Automatic";
  if (!$("sampler").value || $("sampler").value === "Euler a") $("sampler").value = "DPM++ 2M Karras";
}

async function setOption(key, value) {
  $("model-status").textContent = `loading ${value} ...`;
  try {
    await post("/sdapi/v1/options", { [key]: value });
    $("model-status").textContent = "";
  } catch (e) { $("model-status").textContent = e.message; }
}
$("checkpoint").addEventListener("change", () => setOption("sd_model_checkpoint", $("checkpoint").value));
$("vae").addEventListener("change", () => setOption("sd_vae", $("vae").value));

let tokenTimers = {};
function countTokens(field, out) {
  clearTimeout(tokenTimers[field]);
  tokenTimers[field] = setTimeout(async () => {
    try {
      const r = await api(`/sdtune/v1/tokens?prompt=${encodeURIComponent($(field).value)}`);
      $(out).textContent = r.chunks.map((n) => `${n}/75`).join(" + ");
      $(out).classList.toggle("over", r.chunks.length > 1);
    } catch (e) { $(out).textContent = "?"; }
  }, 250);
}
$("prompt").addEventListener("input", () => countTokens("prompt", "prompt-tokens"));
$("negative").addEventListener("input", () => countTokens("negative", "negative-tokens"));
$("seed-random").addEventListener("click", () => { $("seed").value = -1; });
$("seed-recycle").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });

function intOrNull(id) { const v = $(id).value.trim(); return v === "" ? null : parseInt(v, 10); }

function txt2imgRequest() {
  const request = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: intOrNull("steps"), cfg_scale: parseFloat($("cfg").value), seed: intOrNull("seed") ?? -1,
    width: intOrNull("width"), height: intOrNull("height"), batch_size: intOrNull("batch-size") ?? 1,
    n_iter: intOrNull("batch-count") ?? 1, save_images: true, send_images: true,
  };
  if ($("refiner").value) {
    request.refiner_checkpoint = $("refiner").value;
    request.refiner_switch_at = parseFloat($("refiner-switch").value);
  }
  return request;
}

let polling = null;
async function pollProgress() {
  try {
    const p = await api("/sdapi/v1/progress");
    $("progress-bar").style.width = `${Math.round(p.progress * 100)}%`;
    const s = p.state;
    const waiting = s.queued ? ` (${s.queued} waiting)` : "";
    const batch = s.job_count > 1 ? `batch ${s.job_no + 1} of ${s.job_count}, ` : "";
    $("progress-text").textContent = s.sampling_steps
      ? `${batch}step ${s.sampling_step} of ${s.sampling_steps}, ETA ${p.eta_relative.toFixed(1)} s${waiting}` : `queued${waiting}`;
    if (p.current_image) { $("preview").src = `data:image/png;base64,${p.current_image}`; $("preview").hidden = false; }
  } catch (e) { /* the next poll tries again */ }
}

async function generate() {
  showError("generate-error", null);
  $("generate").disabled = true;
  $("preview").hidden = true;
  polling = setInterval(pollProgress, 400);
  try {
    const result = await post("/sdapi/v1/txt2img", txt2imgRequest());
    const info = JSON.parse(result.info);
    showImages(result.images, info.infotexts);
    lastSeed = info.seed;
    $("progress-bar").style.width = "100%";
    $("progress-text").textContent = `done: ${result.images.length} image(s), seed ${info.seed}`;
  } catch (e) {
    showError("generate-error", e);
  } finally {
    clearInterval(polling);
    $("generate").disabled = false;
    $("preview").hidden = true;
  }
}

function showImages(images, infotexts) {
  const gallery = $("gallery");
  gallery.innerHTML = "";
  images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.className = "gallery-image";
    img.addEventListener("click", () => {
      gallery.querySelectorAll("img").forEach((x) => x.classList.remove("selected"));
      img.classList.add("selected");
      $("infotext").textContent = infotexts[i];
    });
    gallery.appendChild(img);
  });
  const first = gallery.querySelector("img");
  if (first) first.click();
}

$("generate").addEventListener("click", generate);
$("interrupt").addEventListener("click", () => post("/sdapi/v1/interrupt", {}));
$("skip").addEventListener("click", () => post("/sdapi/v1/skip", {}));
document.addEventListener("keydown", (e) => { if (e.ctrlKey && e.key === "Enter") generate(); });

// ---------------------------------------------------------------------------------------------------- extra networks
async function loadCards() {
  try {
    cards = await api("/sdtune/v1/extra-networks");
    renderCards();
  } catch (e) { $("en-cards").textContent = e.message; }
}
function renderCards() {
  const box = $("en-cards");
  const query = $("en-search").value.toLowerCase();
  box.innerHTML = "";
  const list = (cards[cardKind] || []).filter((c) => c.name.toLowerCase().includes(query));
  if (!list.length) box.textContent = "nothing here: add files to the folder given with --lora-dir, --hypernetwork-dir or --embeddings-dir, then Refresh";
  for (const c of list) {
    const card = document.createElement("div");
    card.className = "en-card";
    card.dataset.tag = c.tag;
    card.dataset.name = c.name;
    card.innerHTML = (c.preview ? `<img src="${c.preview}" alt="">` : '<div class="nopreview"></div>')
      + `<div class="name"></div><div class="family">${c.family || ""}</div>`;
    card.querySelector(".name").textContent = c.name;
    card.addEventListener("click", () => insertTag(c.tag));
    box.appendChild(card);
  }
}
function insertTag(tag) {
  const p = $("prompt");
  if (p.value.includes(tag)) { p.value = p.value.replace(tag, "").replace(/\s{2,}/g, " ").trim(); }
  else { p.value = p.value.trim() ? `${p.value.trim()} ${tag}` : tag; }
  countTokens("prompt", "prompt-tokens");
}
document.querySelectorAll(".en-tab").forEach((t) => t.addEventListener("click", () => {
  cardKind = t.dataset.kind;
  document.querySelectorAll(".en-tab").forEach((x) => x.classList.toggle("active", x === t));
  renderCards();
}));
$("en-search").addEventListener("input", renderCards);
$("en-refresh").addEventListener("click", loadCards);

// ---------------------------------------------------------------------------------------------------- png info
async function readPng(file) {
  const b64 = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.readAsDataURL(file);
  });
  try {
    const r = await post("/sdapi/v1/png-info", { image: b64 });
    $("pnginfo-text").textContent = r.info || "(no parameters in this image)";
    lastPngParams = r.info ? r.parameters : null;
    $("pnginfo-send").disabled = !lastPngParams;
  } catch (e) { $("pnginfo-text").textContent = e.message; }
}
$("pnginfo-file").addEventListener("change", (e) => { if (e.target.files[0]) readPng(e.target.files[0]); });
const drop = $("pnginfo-drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) readPng(e.dataTransfer.files[0]); });
$("pnginfo-send").addEventListener("click", () => {
  const p = lastPngParams;
  if (!p) return;
  $("prompt").value = p.Prompt || "";
  $("negative").value = p["Negative prompt"] || "";
  if (p.Steps) $("steps").value = p.Steps;
  if (p["CFG scale"]) $("cfg").value = p["CFG scale"];
  if (p.Seed) $("seed").value = p.Seed;
  if (p.Sampler && [...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  if (p["Size-1"] && p["Size-2"]) { $("width").value = p["Size-1"]; $("height").value = p["Size-2"]; }
  showTab("generate");
  countTokens("prompt", "prompt-tokens");
});

// ---------------------------------------------------------------------------------------------------- train
async function loadSchema() {
  schema = await api("/sdtune/v1/schema");
  const select = $("train-method");
  select.innerHTML = "";
  for (const name of Object.keys(schema.methods)) select.add(new Option(name, name));
  select.value = "ti";
  const processes = $("train-processes");
  processes.max = String(schema.processes.max);
  $("processes-label").title = schema.processes.help;
  processes.title = schema.processes.help;  // the field's own tooltip, as the form's fields have
  renderTrainForm();
}
function fieldInput(f, prefix) {
  const wrap = document.createElement("label");
  wrap.className = "field";
  wrap.title = f.help || "";
  const label = document.createElement("span");
  label.textContent = f.name;
  let input;
  if (f.choices) {
    input = document.createElement("select");
    for (const c of f.choices) input.add(new Option(c, c));
    input.value = f.default ?? f.choices[0];
  } else if (f.kind === "bool") {
    input = document.createElement("select");
    for (const c of ["", "true", "false"]) input.add(new Option(c || "(default)", c));
    input.value = f.default === null || f.default === undefined ? "" : String(f.default);
  } else {
    input = document.createElement("input");
    input.value = Array.isArray(f.default) ? f.default.join(", ") : (f.default ?? "");
    input.placeholder = f.default === null || f.default === undefined ? "(unset)" : "";
  }
  input.dataset.field = f.name;
  input.dataset.kind = f.kind;
  input.dataset.scope = prefix;
  input.dataset.initial = input.value;
  input.id = `f-${prefix}-${f.name}`;
  wrap.append(label, input);
  return wrap;
}
const HIDDEN_FIELDS = new Set(["out", "resume", "progress", "device", "data"]);
function renderTrainForm() {
  const method = $("train-method").value;
  const m = schema.methods[method];
  $("method-guidance").textContent = m.guidance;
  const form = $("train-form");
  form.innerHTML = "";
  const sections = {};
  for (const f of schema.fields) {
    if (HIDDEN_FIELDS.has(f.name)) continue;
    (sections[f.section] = sections[f.section] || []).push(f);
  }
  const own = document.createElement("fieldset");
  own.innerHTML = `<legend>${method}</legend>`;
  for (const f of m.options) own.appendChild(fieldInput(f, "method"));
  form.appendChild(own);
  for (const [section, fields] of Object.entries(sections)) {
    const fs = document.createElement("fieldset");
    fs.innerHTML = `<legend>${section}</legend>`;
    for (const f of fields) fs.appendChild(fieldInput(f, "config"));
    form.appendChild(fs);
  }
  const preset = $("preset");
  preset.innerHTML = '<option value="">defaults</option>';
  (m.presets || []).forEach((p, i) => preset.add(new Option(p.name, String(i))));
}
$("train-method").addEventListener("change", renderTrainForm);
function setField(scope, name, value) {
  const el = $(`f-${scope}-${name}`);
  if (el) el.value = Array.isArray(value) ? value.join(", ") : String(value);
}
$("preset").addEventListener("change", () => {
  renderTrainFormKeepPreset();
});
function renderTrainFormKeepPreset() {
  const index = $("preset").value;
  const method = $("train-method").value;
  const chosen = index === "" ? null : schema.methods[method].presets[parseInt(index, 10)];
  renderTrainForm();
  $("preset").value = index;
  if (!chosen) return;
  for (const [k, v] of Object.entries(chosen.values)) {
    if (k === method && typeof v === "object") { for (const [ok, ov] of Object.entries(v)) setField("method", ok, ov); }
    else setField("config", k, v);
  }
}
function convert(value, kind) {
  if (kind === "strs") return value.split(",").map((s) => s.trim()).filter(Boolean);
  if (kind === "ints") return value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => parseInt(s, 10));
  if (kind === "bool") return value === "true";
  return value;  // the server checks and converts numbers (one schema, one set of messages)
}
function trainConfig() {
  const method = $("train-method").value;
  const config = { [method]: {} };
  document.querySelectorAll("#train-form [data-field]").forEach((el) => {
    if (el.value === el.dataset.initial || el.value === "") return;  // defaults stay defaults
    const value = convert(el.value, el.dataset.kind);
    if (el.dataset.scope === "method") config[method][el.dataset.field] = value; else config[el.dataset.field] = value;
  });
  const data = $("dataset-path").value.trim();
  if (data) config.data = data;
  return { method, config };
}
$("train-start").addEventListener("click", async () => {
  showError("train-error", null);
  try {
    const { method, config } = trainConfig();
    const given = $("train-processes").value.trim();
    const processes = given === "" ? 1 : Number(given);  // the server checks the bound (0 is refused, not 1)
    const r = await post("/sdtune/v1/runs", { method, name: $("run-name").value.trim(), config, processes });
    showTab("runs");
    openRun(r.run);
  } catch (e) { showError("train-error", e); }
});
// the wrong-lora recipe: a job like a run, followed here until it ends
let recipeTimer = null;
function showRecipeStatus(text, status) {
  const box = $("recipe-status");
  box.hidden = !text;  // no empty bar before a recipe ran
  box.textContent = text;
  box.dataset.status = status;
}
function showRecipeGrid(name, grid) {
  const img = $("recipe-grid");
  img.hidden = !grid;
  if (!grid) { img.removeAttribute("src"); return; }
  const src = `/sdtune/v1/runs/${encodeURIComponent(name)}/file?path=${encodeURIComponent(grid)}`;
  if (img.getAttribute("src") !== src) img.src = src;
}
async function followRecipe(name) {
  clearTimeout(recipeTimer);
  let doc;
  try { doc = await api(`/sdtune/v1/recipes/wrong-lora/${encodeURIComponent(name)}`); }
  catch (e) { showRecipeStatus(e.message, "refused"); showRecipeGrid(name, null); return; }
  const figures = Object.entries((doc.report || {}).variants || {})
    .map(([k, v]) => `${k}: ${Object.entries(v.figures || {}).map(([f, x]) => `${f} ${x.toFixed(3)}`).join("  ")}`);
  showRecipeStatus([`${name}: ${doc.status}`, doc.message, ...figures].filter(Boolean).join("\n"), doc.status);
  showRecipeGrid(name, (doc.files || {}).grid);
  if (doc.status === "running" || doc.status === "queued") recipeTimer = setTimeout(() => followRecipe(name), 1000);
}
$("recipe-start").addEventListener("click", async () => {
  const name = $("run-name").value.trim();
  const settings = { images: parseInt($("recipe-images").value, 10), train: { steps: parseInt($("recipe-steps").value, 10) } };
  try { await post("/sdtune/v1/recipes/wrong-lora", { name, settings }); followRecipe(name); }
  catch (e) { showRecipeStatus(e.message, "refused"); }
});
$("recipe-stop").addEventListener("click", () => {
  const name = $("run-name").value.trim();
  post(`/sdtune/v1/recipes/wrong-lora/${encodeURIComponent(name)}/stop`, {}).then(() => followRecipe(name))
    .catch((e) => { showRecipeStatus(e.message, "refused"); });
});
$("toml-save").addEventListener("click", async () => {
  try {
    const { method, config } = trainConfig();
    const r = await post("/sdtune/v1/config/toml", { method, config });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([r.toml], { type: "application/toml" }));
    link.download = `${$("run-name").value || method}.toml`;
    link.click();
  } catch (e) { showError("train-error", e); }
});
$("toml-load").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  try {
    const r = await post("/sdtune/v1/config/parse", { toml: await file.text() });
    $("train-method").value = r.method;
    renderTrainForm();
    for (const [section, values] of Object.entries(r.config)) {
      if (section === "method" || typeof values !== "object") continue;
      for (const [k, v] of Object.entries(values)) {
        if (v === null) continue;
        if (section === r.method) setField("method", k, v); else if (k === "data") $("dataset-path").value = v; else setField("config", k, v);
      }
    }
  } catch (err) { showError("train-error", err); }
});

// datasets
async function loadDataset() {
  const path = $("dataset-path").value.trim();
  const box = $("dataset-items");
  box.innerHTML = "";
  try {
    const r = await api(`/sdtune/v1/datasets?path=${encodeURIComponent(path)}`);
    for (const item of r.items) {
      const div = document.createElement("div");
      div.className = "item";
      const img = document.createElement("img");
      img.src = `/sdtune/v1/datasets/image?path=${encodeURIComponent(path)}&image=${encodeURIComponent(item.image)}`;
      const caption = document.createElement("textarea");
      caption.rows = 2;
      caption.value = item.caption ?? "";
      caption.placeholder = "(no caption file: --prompt is used)";
      caption.dataset.image = item.image;
      caption.addEventListener("change", async () => {
        try {
          await post(`/sdtune/v1/datasets/caption?path=${encodeURIComponent(path)}`, { path: item.image, caption: caption.value }, "PUT");
          caption.classList.add("saved");
        } catch (e) { showError("train-error", e); }
      });
      div.append(img, caption);
      box.appendChild(div);
    }
    if (!r.items.length) box.textContent = "no images in this folder";
  } catch (e) { showError("train-error", e); }
}
$("dataset-load").addEventListener("click", loadDataset);
$("dataset-check").addEventListener("click", async () => {
  const report = $("dataset-report");
  report.hidden = false;
  report.textContent = "checking ...";
  try {
    const r = await post("/sdtune/v1/datasets/check", { path: $("dataset-path").value.trim(), method: $("train-method").value });
    report.textContent = r.text;
  } catch (e) { report.textContent = e.message; }
});

// ---------------------------------------------------------------------------------------------------- runs
let runsShown = null;  // what the list shows, so a poll that finds nothing new leaves it alone
async function loadRuns() {
  try {
    const runs = await api("/sdtune/v1/runs");
    const list = $("runs-list");
    const shown = JSON.stringify([runs.map((r) => [r.name, r.method, r.status]), currentRun]);
    if (shown === runsShown && list.children.length) return;
    runsShown = shown;
    list.innerHTML = "";
    for (const r of runs) {
      const li = document.createElement("li");
      li.dataset.run = r.name;
      li.textContent = `${r.name} (${r.method}) ${r.status}`;
      li.classList.toggle("selected", r.name === currentRun);
      li.addEventListener("click", () => openRun(r.name));
      list.appendChild(li);
    }
  } catch (e) { $("runs-list").textContent = e.message; }
}
let runTimer = null;
function openRun(name) {
  currentRun = name;
  $("run-view").hidden = false;
  clearInterval(runTimer);
  refreshRun();
  runTimer = setInterval(refreshRun, 1500);
}
async function refreshRun() {
  if (!currentRun) return;
  let r;
  try { r = await api(`/sdtune/v1/runs/${encodeURIComponent(currentRun)}`); } catch (e) { $("run-message").textContent = e.message; return; }
  $("run-title").textContent = `${r.name} (${r.method || "?"})`;
  const changed = $("run-status").dataset.status !== r.status;  // started, ended: the runs list shows it
  $("run-status").textContent = r.status;
  $("run-status").dataset.status = r.status;
  const cv = r.cv;  // a cross-validation (cv_folds): its progress and recommended step
  const cvLine = !cv ? "" : `cross-validation: ${cv.folds_done} of ${cv.folds} folds done` +
    (cv.recommendation ? `; recommended step ${cv.recommendation.step} by ${cv.metric} (start this run name again with steps = auto)` : "");
  $("run-message").textContent = [r.message || "", cvLine].filter(Boolean).join("\n");
  $("run-stop").disabled = !(r.status === "running" || r.status === "queued");
  $("run-resume").disabled = r.status === "running" || r.status === "queued";
  drawLosses(r.losses, r.val_losses);
  renderRows(r.rows || []);
  const samples = $("run-samples");
  const have = [...samples.querySelectorAll("img")].map((i) => i.dataset.path).join("|");
  if (have !== r.samples.join("|")) {
    samples.innerHTML = "";
    for (const s of r.samples) samples.appendChild(sampleFigure(r.name, s));
  }
  if (changed) loadRuns();
  if (!["running", "queued"].includes(r.status)) clearInterval(runTimer);
}
function sampleFigure(run, path) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.dataset.path = path;
  img.className = "sample";
  img.src = `/sdtune/v1/runs/${encodeURIComponent(run)}/file?path=${encodeURIComponent(path)}`;
  img.title = path;
  const caption = document.createElement("figcaption");
  const step = path.match(/-(\d+)\.png$/);  // samples/<name>-<step>.png
  caption.textContent = step ? `step ${Number(step[1])}` : path.split("/").pop();
  figure.append(img, caption);
  return figure;
}
function renderRows(rows) {
  const table = $("run-rows");
  if (!rows.length) { table.innerHTML = ""; return; }
  const cols = Object.keys(rows[0]).filter((c) => c !== "file");
  table.innerHTML = `<tr>${cols.map((c) => `<th>${c}</th>`).join("")}<th>file</th></tr>`;
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = cols.map((c) => `<td>${typeof row[c] === "number" ? Number(row[c].toPrecision(5)) : (row[c] ?? "")}</td>`).join("");
    const td = document.createElement("td");
    if (row.file) {
      const a = document.createElement("a");
      a.href = `/sdtune/v1/runs/${encodeURIComponent(currentRun)}/file?path=${encodeURIComponent(row.file)}`;
      a.textContent = row.file;
      const use = document.createElement("button");
      use.textContent = "use in Generate";
      use.className = "use";
      use.dataset.step = row.step;
      use.addEventListener("click", () => useCheckpoint(row.step));
      td.append(a, " ", use);
    }
    tr.appendChild(td);
    table.appendChild(tr);
  }
}
async function useCheckpoint(step) {
  try {
    const r = await post(`/sdtune/v1/runs/${encodeURIComponent(currentRun)}/use?step=${step}`, {});
    if (r.checkpoint) { await loadModels(); $("checkpoint").value = r.checkpoint; await setOption("sd_model_checkpoint", r.checkpoint); }
    if (r.prompt && !$("prompt").value.includes(r.prompt)) insertTag(r.prompt);
    loadCards();
    showTab("generate");
  } catch (e) { $("run-message").textContent = e.message; }
}
function drawLosses(losses, val) {
  const canvas = $("loss-chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.points = String(losses.length);
  if (!losses.length) return;
  const all = losses.concat(val);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys, Math.min(...ys) + 1e-9)];
  const X = (x) => 40 + (canvas.width - 50) * (x - x0) / (x1 - x0);
  const Y = (y) => canvas.height - 20 - (canvas.height - 30) * (y - y0) / (y1 - y0);
  ctx.fillStyle = "#9aa0aa";
  ctx.font = "11px sans-serif";
  ctx.fillText(y1.toPrecision(3), 2, 14);
  ctx.fillText(y0.toPrecision(3), 2, canvas.height - 22);
  ctx.fillText(`step ${x1}`, canvas.width - 60, canvas.height - 4);
  const line = (points, color) => {
    ctx.strokeStyle = color;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
  };
  line(losses, "#e8703a");
  if (val.length) line(val, "#5ab0ff");
}
$("run-stop").addEventListener("click", () => post(`/sdtune/v1/runs/${encodeURIComponent(currentRun)}/stop`, {}).then(refreshRun));
$("run-resume").addEventListener("click", async () => {
  try { await post(`/sdtune/v1/runs/${encodeURIComponent(currentRun)}/resume`, {}); openRun(currentRun); }
  catch (e) { $("run-message").textContent = e.message; }
});

// ---------------------------------------------------------------------------------------------------- queue status
async function pollQueue() {
  try {
    const q = await api("/sdtune/v1/jobs");
    const cur = q.current ? `${q.current.kind}: ${q.current.title} (${q.current.step}/${q.current.total})` : "idle";
    $("queue-status").textContent = q.queued.length ? `${cur}; ${q.queued.length} waiting` : cur;
  } catch (e) { $("queue-status").textContent = ""; }
}

loadModels().catch((e) => showError("generate-error", e));
loadSchema().catch((e) => showError("train-error", e));
loadCards();
setInterval(pollQueue, 2000);
pollQueue();
// runs started elsewhere (the CLI, the API, another browser) appear while the Runs page is open
setInterval(() => { if ($("page-runs").classList.contains("active")) loadRuns(); }, 3000);
