// synthtrial view, run page: patients, grader accuracy (count vs truth) and the effects beside the truth.
"use strict";

function patientsTable(index) {
  const body = document.querySelector("#patients tbody");
  for (const p of index.patients) {
    const row = h("tr", {}, null, body);
    const cell = h("td", {}, null, row);
    h("a", {href: `index.html#${encodeURIComponent(p.id)}/0/${p.views[0]}`}, p.id, cell);
    h("td", {}, String(p.days), row);
    h("td", {class: "text"}, p.views.join(", "), row);
  }
}

function scatter(pair, parent) {
  const W = 250, H = 230, L = 40, R = 8, T = 18, B = 30;
  const all = pair.points.flatMap(([t, g]) => [t, g]);
  const lo = Math.min(0, ...all), hi = Math.max(...all);
  const x = linear(lo, hi, L, W - R), y = linear(lo, hi, H - B, T);
  const svg = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "scatter",
                            "data-column": pair.column}, parent);
  svgEl("text", {x: L, y: 12, class: "legend"}, svg, pair.column);
  const axis = svgEl("g", {class: "axis"}, svg);
  for (const t of ticks(lo, hi)) {
    svgEl("text", {x: L - 5, y: y(t) + 4, "text-anchor": "end"}, axis, fmt(t, Number.isInteger(t) ? 0 : 1));
    svgEl("text", {x: x(t), y: H - B + 14, "text-anchor": "middle"}, axis, fmt(t, Number.isInteger(t) ? 0 : 1));
  }
  svgEl("text", {x: (L + W) / 2, y: H - 3, "text-anchor": "middle"}, axis, `truth: ${pair.truth}`);
  svgEl("line", {x1: x(lo), y1: y(lo), x2: x(hi), y2: y(hi), stroke: "#9aa5b1", "stroke-dasharray": "4 3"}, svg);
  const patients = [...new Set(pair.points.map((p) => p[2]))];
  for (const [t, g, p] of pair.points) {
    const dot = svgEl("circle", {cx: x(t), cy: y(g), r: 3, fill: PALETTE[patients.indexOf(p) % PALETTE.length],
                                 "fill-opacity": 0.75, class: "point"}, svg);
    svgEl("title", {}, dot, `${p}: truth ${fmt(t)}, ${pair.column} ${fmt(g)}`);
  }
}

function accuracy(page) {
  const body = document.querySelector("#accuracy tbody");
  if (!page.accuracy.length) {
    h("p", {class: "note"}, "Not graded (or no grade with a known truth): run synthtrial grade RUN.",
      document.getElementById("accuracy-block"));
    return;
  }
  for (const pair of page.accuracy) {
    const row = h("tr", {"data-column": pair.column}, null, body);
    h("td", {}, pair.grader, row);
    h("td", {class: "text"}, pair.column, row);
    h("td", {class: "text"}, pair.truth, row);
    for (const v of [pair.n, pair.mae, pair.bias, pair.r]) h("td", {}, fmt(v), row);
  }
  const box = document.getElementById("scatters");
  for (const pair of page.accuracy) {
    if (/(count|severity)$/.test(pair.column)) scatter(pair, box);
  }
}

// an estimate's interval, its point and the truth on one small axis that includes 0
function intervalCell(row, col, cell) {
  const [est, lo, hi, truth] = ["estimate", "ci_low", "ci_high", "true_effect"].map((c) => col[c] === undefined ? null : row[col[c]]);
  const values = [est, lo, hi, truth, 0].filter((v) => v !== null);
  const W = 160, H = 16, x = linear(Math.min(...values), Math.max(...values), 6, W - 6);
  const svg = svgEl("svg", {width: W, height: H, class: "interval"}, cell);
  svgEl("line", {x1: x(0), x2: x(0), y1: 0, y2: H, stroke: "#cbd2d9"}, svg);
  if (lo !== null && hi !== null) svgEl("line", {x1: x(lo), x2: x(hi), y1: H / 2, y2: H / 2, stroke: "#2563eb", "stroke-width": 2}, svg);
  if (est !== null) svgEl("circle", {cx: x(est), cy: H / 2, r: 3.5, fill: "#2563eb"}, svg);
  if (truth !== null) svgEl("line", {x1: x(truth), x2: x(truth), y1: 1, y2: H - 1, stroke: "#dc2626", "stroke-width": 2.5, class: "truth-mark"}, svg);
}

function effects(page, index) {
  const block = document.getElementById("effects-block");
  if (!page.effects) {
    h("p", {class: "note"}, "Not analysed: run synthtrial analyze RUN.", block);
    document.getElementById("scope").disabled = true;
    return;
  }
  const {columns, rows} = page.effects;
  const col = Object.fromEntries(columns.map((c, i) => [c, i]));
  const head = h("tr", {}, null, document.querySelector("#effects thead"));
  for (const c of columns) h("th", {class: typeof rows[0]?.[col[c]] === "string" ? "text" : ""}, c, head);
  h("th", {class: "text", title: "blue: estimate and CI; red: truth; grey: zero"}, "estimate | truth", head);
  const patients = new Set(index.patients.map((p) => p.id));
  const select = document.getElementById("scope");
  const draw = () => {
    const body = document.querySelector("#effects tbody");
    body.replaceChildren();
    for (const row of rows) {
      const scope = col.scope === undefined ? "pooled" : row[col.scope];
      const perPatient = patients.has(scope);
      if ((select.value === "pooled" && perPatient) || (select.value === "patients" && !perPatient)) continue;
      const tr = h("tr", {}, null, body);
      for (const c of columns) {
        const v = row[col[c]];
        h("td", {class: typeof v === "string" ? "text" : ""}, c === "p" ? fmtP(v) : fmt(v), tr);
      }
      intervalCell(row, col, h("td", {class: "text"}, null, tr));
    }
  };
  select.addEventListener("change", draw);
  draw();
}

(async () => {
  try {
    const [index, page] = await Promise.all([getJSON("data/index.json"), getJSON("data/run.json")]);
    document.getElementById("run-name").textContent = index.run;
    patientsTable(index);
    accuracy(page);
    effects(page, index);
    document.body.dataset.ready = "1";
  } catch (error) {
    showError(error);
  }
})();
