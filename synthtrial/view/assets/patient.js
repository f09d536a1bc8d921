// synthtrial view, patient page: one patient's series with overlays and its trajectory.
// Data: data/index.json (the run), data/patient/<id>.json (days, views, boxes, series); type maps are 8-bit
// PNGs whose pixel is the lesion type's value (index + 1), coloured here per type.
"use strict";

const state = {index: null, patient: null, day: 0, view: "frontal", masks: false, boxes: false,
               types: new Set(), layers: new Set(), gradcam: "", token: 0};
const typemaps = new Map();   // url -> Promise of ImageData
const SCALE_NAMES = {severity: "severity (0–3)", count: "lesion count", iga: "grade (IGA / level)",
                     new: "new inflammatory lesions"};
const LAYER_COLORS = ["#22d3ee", "#a3e635", "#f472b6", "#fb923c"];

function typeOf(value) { return state.index.types[value - 1]; }

function currentEntry() {
  const day = state.patient.days[state.day];
  const views = Object.keys(day.views);
  if (!(state.view in day.views)) state.view = views.includes("frontal") ? "frontal" : views[0];
  return {day, entry: day.views[state.view]};
}

// ---------------------------------------------------------------------------------------- controls
function buildControls() {
  const select = document.getElementById("patient");
  for (const p of state.index.patients) h("option", {value: p.id}, `${p.id} (${p.days} days)`, select);
  select.addEventListener("change", () => openPatient(select.value, 0));
  const views = document.getElementById("views");
  for (const v of ["frontal", "left", "right"]) {
    const b = h("button", {type: "button", "data-view": v}, v, views);
    b.addEventListener("click", () => { state.view = v; render(); });
  }
  const filters = document.getElementById("type-filters");
  for (const t of state.index.types) {
    state.types.add(t.value);
    const label = h("label", {}, null, filters);
    const box = h("input", {type: "checkbox", checked: "", "data-type": t.name}, null, label);
    h("span", {class: "swatch", style: `background:${t.color}`}, null, label);
    label.append(t.name.replace("_", " "));
    box.addEventListener("change", () => { box.checked ? state.types.add(t.value) : state.types.delete(t.value); render(); });
  }
  const layers = document.getElementById("layer-toggles");
  state.index.layers.forEach((layer, k) => {
    layer.color = LAYER_COLORS[k % LAYER_COLORS.length];
    const label = h("label", {}, null, layers);
    const box = h("input", {type: "checkbox", "data-layer": layer.table}, null, label);
    h("span", {class: "swatch", style: `background:${layer.color}`}, null, label);
    label.append(`${layer.grader}: ${layer.table === "tracks.parquet" ? "tracks" : "detections"}`);
    box.addEventListener("change", () => { box.checked ? state.layers.add(layer.table) : state.layers.delete(layer.table); render(); });
  });
  for (const [id, key] of [["show-masks", "masks"], ["show-boxes", "boxes"]]) {
    document.getElementById(id).addEventListener("change", (e) => { state[key] = e.target.checked; render(); });
  }
  document.getElementById("gradcam").addEventListener("change", (e) => { state.gradcam = e.target.value; render(); });
  document.getElementById("gradcam-row").classList.toggle("hidden", !state.index.gradcam);
  const slider = document.getElementById("day-slider");
  slider.addEventListener("input", () => { state.day = Number(slider.value); render(); });
  document.getElementById("prev").addEventListener("click", () => step(-1));
  document.getElementById("next").addEventListener("click", () => step(1));
  document.addEventListener("keydown", (e) => {
    if (e.target === slider || e.target.tagName === "SELECT") return;   // they handle their own keys
    if (e.key === "ArrowLeft") { step(-1); e.preventDefault(); }
    if (e.key === "ArrowRight") { step(1); e.preventDefault(); }
  });
}

function step(delta) {
  const next = Math.min(Math.max(state.day + delta, 0), state.patient.days.length - 1);
  if (next !== state.day) { state.day = next; render(); }
}

async function openPatient(id, day) {
  state.patient = await getJSON(`data/patient/${encodeURIComponent(id)}.json`);
  state.day = Math.min(day, state.patient.days.length - 1);
  document.getElementById("patient").value = id;
  const slider = document.getElementById("day-slider");
  slider.max = String(state.patient.days.length - 1);
  drawTrajectory();
  render();
}

// ------------------------------------------------------------------------------------------ render
function render() {
  const {day, entry} = currentEntry();
  document.getElementById("day-slider").value = String(state.day);
  document.getElementById("day-label").textContent =
    `day ${day.day}${day.date ? " · " + day.date : ""} · ${day.treatment} · ${state.day + 1}/${state.patient.days.length}`;
  for (const b of document.querySelectorAll("#views button")) {
    b.disabled = !(b.dataset.view in day.views);
    b.classList.toggle("active", b.dataset.view === state.view);
  }
  const gradcam = document.getElementById("gradcam");
  const names = Object.keys(entry.gradcam);
  gradcam.replaceChildren(h("option", {value: ""}, "off"), ...names.map((n) => h("option", {value: n}, n)));
  gradcam.value = names.includes(state.gradcam) ? state.gradcam : "";
  const photo = document.getElementById("photo");
  photo.src = gradcam.value ? entry.gradcam[gradcam.value] : entry.image;
  photo.dataset.day = String(day.day);
  drawMasks(entry);
  drawBoxes(entry);
  moveMarker(day.day);
  dayValues();
  history.replaceState(null, "", `#${state.patient.id}/${state.day}/${state.view}`);
}

function typemapData(url) {
  if (!typemaps.has(url)) {
    typemaps.set(url, new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        resolve(ctx.getImageData(0, 0, c.width, c.height));
      };
      img.onerror = () => reject(new Error(url + ": not loaded"));
      img.src = url;
    }));
  }
  return typemaps.get(url);
}

async function drawMasks(entry) {
  const canvas = document.getElementById("mask-layer");
  const token = ++state.token;
  canvas.width = entry.width; canvas.height = entry.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.ready = "0";
  if (!state.masks) { canvas.dataset.ready = "1"; return; }
  const source = await typemapData(entry.typemap);
  if (token !== state.token) return;       // the day or view changed meanwhile
  const out = ctx.createImageData(source.width, source.height);
  const rgb = state.index.types.map((t) => [1, 3, 5].map((i) => parseInt(t.color.slice(i, i + 2), 16)));
  for (let p = 0; p < source.data.length; p += 4) {
    const value = source.data[p];
    if (value > 0 && state.types.has(value)) {
      const [r, g, b] = rgb[value - 1];
      out.data[p] = r; out.data[p + 1] = g; out.data[p + 2] = b; out.data[p + 3] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
  canvas.dataset.ready = "1";
}

function drawBoxes(entry) {
  const svg = document.getElementById("box-layer");
  svg.setAttribute("viewBox", `0 0 ${entry.width} ${entry.height}`);
  svg.replaceChildren();
  const thin = Math.max(entry.width / 400, 0.5);
  if (state.boxes) {
    for (const [x0, y0, x1, y1, type, id] of entry.lesions) {
      if (!state.types.has(type)) continue;
      const t = typeOf(type);
      const r = svgEl("rect", {x: x0, y: y0, width: Math.max(x1 - x0, thin), height: Math.max(y1 - y0, thin),
                               fill: "none", stroke: t.color, "stroke-width": thin, class: "lesion-box",
                               "data-type": t.name}, svg);
      svgEl("title", {}, r, `${t.name} #${id}`);
    }
  }
  for (const layer of state.index.layers) {
    if (!state.layers.has(layer.table)) continue;
    for (const [x0, y0, x1, y1, cls, label, counted] of entry.boxes[layer.table] || []) {
      const r = svgEl("rect", {x: x0, y: y0, width: x1 - x0, height: y1 - y0, fill: "none", stroke: layer.color,
                               "stroke-width": thin * 1.5, "stroke-dasharray": counted === false ? `${thin * 2}` : "none",
                               class: "detection-box", "data-layer": layer.table}, svg);
      svgEl("title", {}, r, `${layer.grader}: ${cls} ${layer.table === "tracks.parquet" ? "track " : "score "}${label}`);
      if (layer.table === "tracks.parquet") {
        svgEl("text", {x: x1 + thin, y: y0, fill: layer.color, "font-size": entry.width / 40}, svg, String(label));
      }
    }
  }
}

// -------------------------------------------------------------------------------------- trajectory
function drawTrajectory() {
  const box = document.getElementById("trajectory");
  box.replaceChildren();
  const days = state.patient.days.map((d) => d.day);
  const groups = new Map();
  for (const series of state.patient.series) {
    if (series.values.every((v) => v === null)) continue;
    if (!groups.has(series.scale)) groups.set(series.scale, []);
    groups.get(series.scale).push(series);
  }
  let colour = 0;
  const W = 560, H = 160, L = 44, R = 10, T = 24, B = 22;
  const x = linear(days[0], days[days.length - 1], L, W - R);
  for (const [scale, members] of groups) {
    const values = members.flatMap((m) => m.values).filter((v) => v !== null);
    const lo = Math.min(0, ...values), hi = Math.max(...values);
    const y = linear(lo, hi === lo ? lo + 1 : hi, H - B, T);
    const legendRows = Math.ceil(members.length / 3);
    const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H + 16 * legendRows}`, class: "panel", "data-scale": scale}, box);
    svgEl("text", {x: L, y: 14, class: "legend", "font-weight": "bold"}, svg, SCALE_NAMES[scale] || scale);
    const axis = svgEl("g", {class: "axis"}, svg);
    for (const t of ticks(lo, hi === lo ? lo + 1 : hi)) {
      svgEl("line", {x1: L - 4, x2: L, y1: y(t), y2: y(t)}, axis);
      svgEl("text", {x: L - 6, y: y(t) + 4, "text-anchor": "end"}, axis, fmt(t, Number.isInteger(t) ? 0 : 1));
    }
    for (const t of ticks(days[0], days[days.length - 1]).filter(Number.isInteger)) {
      svgEl("text", {x: x(t), y: H - 6, "text-anchor": "middle"}, axis, String(t));
    }
    svgEl("line", {x1: L, x2: W - R, y1: H - B, y2: H - B}, axis);
    members.forEach((m, k) => {
      const colourOf = m.source === "truth" ? (k === 0 ? "#111" : "#777") : PALETTE[colour++ % PALETTE.length];
      let d = "", pen = "M";
      m.values.forEach((v, i) => {
        if (v === null) { pen = "M"; return; }
        d += `${pen}${x(days[i]).toFixed(1)},${y(v).toFixed(1)} `; pen = "L";
      });
      svgEl("path", {d, fill: "none", stroke: colourOf, "stroke-width": m.source === "truth" ? 2.2 : 1.5,
                     "stroke-dasharray": m.source === "analysis" ? "5 3" : "none", class: "series",
                     "data-series": m.name}, svg);
      const lx = L + (k % 3) * 170, ly = H + 6 + 16 * Math.floor(k / 3);
      svgEl("line", {x1: lx, x2: lx + 16, y1: ly, y2: ly, stroke: colourOf, "stroke-width": 2}, svg);
      svgEl("text", {x: lx + 20, y: ly + 4, class: "legend"}, svg, `${m.source === "truth" ? "truth " : ""}${m.name}`);
    });
    svgEl("line", {x1: L, x2: L, y1: T, y2: H - B, class: "day-marker"}, svg);
    svg.addEventListener("click", (e) => {
      const rect = svg.getBoundingClientRect();
      const at = (e.clientX - rect.left) / rect.width * W;
      let best = 0;
      days.forEach((d, i) => { if (Math.abs(x(d) - at) < Math.abs(x(days[best]) - at)) best = i; });
      state.day = best; render();
    });
    svg.dataset.x0 = String(days[0]); svg.dataset.x1 = String(days[days.length - 1]);
  }
  box.dataset.scale = JSON.stringify([days[0], days[days.length - 1], L, W - R]);
}

function moveMarker(day) {
  const [d0, d1, r0, r1] = JSON.parse(document.getElementById("trajectory").dataset.scale);
  const at = linear(d0, d1, r0, r1)(day).toFixed(1);
  for (const line of document.querySelectorAll("#trajectory .day-marker")) {
    line.setAttribute("x1", at); line.setAttribute("x2", at);
  }
}

function dayValues() {
  const body = document.querySelector("#day-values tbody");
  body.replaceChildren();
  for (const series of state.patient.series) {
    const v = series.values[state.day];
    if (v === null) continue;
    const row = h("tr", {}, null, body);
    h("td", {class: "text"}, `${series.source === "truth" ? "truth " : ""}${series.name}`, row);
    h("td", {}, fmt(v), row);
  }
}

// -------------------------------------------------------------------------------------------- start
async function openFromHash() {
  const [id, day, view] = decodeURIComponent(location.hash.slice(1)).split("/");
  const known = state.index.patients.some((p) => p.id === id);
  if (view) state.view = view;
  await openPatient(known ? id : state.index.patients[0].id, known ? Number(day) || 0 : 0);
}

(async () => {
  try {
    state.index = await getJSON("data/index.json");
    document.getElementById("run-name").textContent = state.index.run;
    buildControls();
    await openFromHash();
    window.addEventListener("hashchange", openFromHash);   // a link to #<patient>/<day index>/<view>
    document.body.dataset.ready = "1";
  } catch (error) {
    showError(error);
  }
})();
