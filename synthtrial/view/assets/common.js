// synthtrial view: helpers shared by the pages (plain JavaScript, no dependencies).
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
// series colours (graders and analysis outcomes); the truth is drawn in black
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(url + ": " + response.status + " " + response.statusText);
  return response.json();
}

// an HTML element: h("td", {class: "text"}, "label", parent)
function h(tag, attrs, text, parent) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

// an SVG element
function svgEl(tag, attrs, parent, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) && digits === undefined ? String(value) : value.toFixed(digits === undefined ? 2 : digits);
}

// a p-value as every command prints it (synthtrial.analyze.estimate.format_p): 0.41, 0.042, <0.001
function fmtP(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 0.001) return "<0.001";
  return value.toFixed(Math.round(value * 1000) / 1000 < 0.1 ? 3 : 2);
}

// a linear map from [d0, d1] to [r0, r1] (a constant domain maps to the middle)
function linear(d0, d1, r0, r1) {
  if (d1 === d0) return () => (r0 + r1) / 2;
  return (v) => r0 + (v - d0) / (d1 - d0) * (r1 - r0);
}

// about five round tick values over [lo, hi]
function ticks(lo, hi) {
  if (hi === lo) return [lo];
  const step0 = (hi - lo) / 4, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((m) => m >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Math.round(v / step) * step);
  return out;
}

function showError(error) {
  const box = h("p", {class: "note", role: "alert"}, "Could not load the run: " + error.message);
  document.querySelector("main").prepend(box);
}
