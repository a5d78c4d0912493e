// The demo page: pick a photo and personalities, POST them to /v1/captions, show the ranked (or generated)
// captions.
"use strict";

const state = { file: null, traits: [], selected: [], hasTraits: true };
const $ = (id) => document.getElementById(id);

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function clearPreview() {
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  $("drop-hint").hidden = false;
}

function setFile(file) {
  if (!file) return;
  clearPreview();
  if (file.type && !file.type.startsWith("image/")) {
    state.file = null;
    return showError(`${file.name} is not an image: choose a JPEG, PNG or WebP photo.`);
  }
  state.file = file;
  const preview = $("preview");
  preview.onerror = () => {  // a file the browser cannot show: say so instead of a broken picture
    clearPreview();
    state.file = null;
    showError(`${file.name} could not be read as an image: choose a JPEG, PNG or WebP photo.`);
  };
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  preview.hidden = false;
  $("drop-hint").hidden = true;
  showError("");
}

function renderChips() {
  const chips = $("selected-traits");
  chips.replaceChildren(...state.selected.map((name) =>
    el("button", { type: "button", className: "chip", textContent: `${name} ×`, title: `Remove ${name}`,
                   onclick: () => toggleTrait(name, false) })));
  for (const box of document.querySelectorAll("#trait-list input")) box.checked = state.selected.includes(box.value);
}

function toggleTrait(name, on) {
  state.selected = state.selected.filter((n) => n !== name);
  if (on) state.selected.push(name);
  renderChips();
}

function renderTraitList(filter = "") {
  const needle = filter.trim().toLowerCase();
  const items = state.traits
    .filter((t) => !needle || [t.name, ...t.synonyms].some((s) => s.toLowerCase().includes(needle)))
    .map((t) => {
      const box = el("input", { type: "checkbox", value: t.name, checked: state.selected.includes(t.name),
                                onchange: (e) => toggleTrait(t.name, e.target.checked) });
      const label = el("label", {}, box, ` ${t.name}`);
      if (t.synonyms.length) label.append(el("span", { className: "synonyms", textContent: ` (${t.synonyms.join(", ")})` }));
      return el("li", { dataset: { trait: t.name } }, label);
    });
  $("trait-list").replaceChildren(...items);
}

async function loadTraits() {
  try {
    const response = await fetch("/v1/personalities");
    const body = await response.json();
    if (!response.ok) throw new Error(body.message || response.statusText);
    state.hasTraits = body.count > 0;
    if (!state.hasTraits) {  // nothing to pick: requests go without a personality
      for (const id of ["trait-search", "selected-traits", "trait-list"]) $(id).hidden = true;
      $("no-traits").textContent = "This model has no personalities: captions are ranked for the photo alone.";
      $("no-traits").hidden = false;
      return;
    }
    state.traits = [{ name: "none", synonyms: ["no personality"] }, ...body.personalities];
    renderTraitList();
  } catch (err) {
    showError(`Could not load the personalities: ${err.message}`);
  }
}

async function useSample(sample) {
  try {
    const response = await fetch(sample.url);
    if (!response.ok) throw new Error(response.statusText);
    const blob = await response.blob();
    setFile(new File([blob], sample.name, { type: blob.type || "image/jpeg" }));
  } catch (err) {
    showError(`Could not load the sample photo: ${err.message}`);
  }
}

async function loadSamples() {
  try {
    const response = await fetch("/v1/samples");
    if (!response.ok) return;
    const body = await response.json();
    if (!body.samples.length) return;
    $("sample-list").replaceChildren(...body.samples.map((sample) =>
      el("button", { type: "button", className: "sample", title: sample.name, onclick: () => useSample(sample) },
         el("img", { src: sample.url, alt: sample.name }))));
    $("samples").hidden = false;
  } catch (err) { /* samples are a convenience; the page works without them */ }
}

async function loadModelInfo() {
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    if (!body.ready) return;
    showModel(body.model, body.index);
    showGenerator(body.generator);
  } catch (err) { /* the page still works; the first answer fills this in */ }
}

function showModel(model, index) {
  const info = $("model-info");
  info.textContent = `Model: ${model.description || model.name} · ${index.size} candidate captions`;
  info.title = `model ${model.version} (text fingerprint ${model.fingerprint}) · index ${index.version}`;
}

// Modes generate and hybrid exist only when the server has a caption generator (GET /readyz: generator).
function showGenerator(generator) {
  if (!generator) return;
  $("mode-picker").hidden = false;
  $("beam-size").value = generator.beam_size;
  $("generator-info").textContent = `Generator: ${generator.description}`;
}

function selectedMode() {
  const checked = document.querySelector('input[name="mode"]:checked');
  return checked && !$("mode-picker").hidden ? checked.value : "retrieve";
}

const LEGENDS = {
  retrieve: "Scores are the model's similarity between the photo, in that personality's voice, and each caption: " +
    "higher means a better fit. They compare captions within one model, not across models.",
  generate: "Captions written word by word by the generator; scores are beam-search log-probabilities " +
    "(closer to 0 is more likely).",
  hybrid: "Captions from the index and from the generator, all scored by the retrieval model's similarity " +
    "(higher is a better fit); the tag says where each came from.",
};

function legend(body) {
  if (!body.consensus_k) return LEGENDS[body.mode || "retrieve"];
  return `Scores are each caption's agreement (CIDEr-D × 100) with the ${body.consensus_k} index captions ` +
    "nearest the photo: higher means closer to what people wrote about similar photos; the tag says where " +
    "each came from.";
}

function captionItem(c) {
  const item = el("li", { className: "caption", dataset: { source: c.source || "retrieved" } },
    el("span", { className: "caption-text", textContent: c.caption }),
    el("span", { className: "score", textContent: c.score.toFixed(3) }));
  if (c.source && c.source !== "retrieved") item.append(el("span", { className: "source", textContent: c.source }));
  return item;
}

function timingText(t) {
  const stages = [["decode", t.decode_ms], ["encode", t.encode_ms], ["search", t.search_ms],
                  ["generate", t.generate_ms], ["rescore", t.rescore_ms],
                  ["consensus", t.consensus_ms]]
    .filter(([, ms]) => ms !== undefined && ms !== null).map(([name, ms]) => `${name} ${ms.toFixed(0)}`);
  const steps = t.decode_steps ? `, ${t.decode_steps} decode steps` : "";
  return `${t.total_ms.toFixed(0)} ms (${stages.join(", ")}${steps})`;
}

function renderResults(body) {
  const sections = body.results.map((result) => el("article", { className: "result" },
    el("h3", { textContent: result.personality }),
    el("ol", {}, ...result.captions.map(captionItem))));
  $("results").replaceChildren(...sections);
  $("score-legend").textContent = legend(body);
  $("score-legend").hidden = false;
  showModel(body.model, body.index);
  $("status").textContent = timingText(body.timings);
}

async function submit(event) {
  event.preventDefault();
  if (!state.file) return showError("Choose or drop a photo first.");
  if (state.hasTraits && !state.selected.length) return showError("Pick at least one personality (or 'none').");
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const name of state.selected) form.append("personality", name);
  form.append("k", $("k").value || "5");
  const mode = selectedMode();
  form.append("mode", mode);
  if (mode !== "retrieve" && $("beam-size").value) form.append("beam_size", $("beam-size").value);
  if (mode !== "retrieve" && $("consensus").checked) form.append("consensus", "true");
  showError("");
  $("submit").disabled = true;
  $("status").textContent = mode === "retrieve" ? "Ranking…" : "Writing captions…";
  try {
    const response = await fetch("/v1/captions", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const hint = body.suggestions && body.suggestions.length ? ` Did you mean: ${body.suggestions.join(", ")}?` : "";
      throw new Error((body.message || response.statusText) + hint);
    }
    renderResults(body);
  } catch (err) {
    $("status").textContent = "";
    $("results").replaceChildren();  // old results would look like the answer to this request
    $("score-legend").hidden = true;
    showError(err.message);
  } finally {
    $("submit").disabled = false;
  }
}

function setupDropZone() {
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (e) => setFile(e.dataTransfer.files[0]));
  $("image-input").addEventListener("change", (e) => setFile(e.target.files[0]));
}

document.addEventListener("DOMContentLoaded", () => {
  setupDropZone();
  $("trait-search").addEventListener("input", (e) => renderTraitList(e.target.value));
  $("caption-form").addEventListener("submit", submit);
  loadTraits();
  loadModelInfo();
  loadSamples();
});
