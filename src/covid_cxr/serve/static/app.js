// Upload an X-ray to /api/v1/predict and show the label, one bar per class and the Grad-CAM overlay.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const fileInput = $("file"), statusEl = $("status"), modelSelect = $("model");

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", Boolean(isError));
  }

  function apiKey() { return sessionStorage.getItem("covid-cxr-api-key") || ""; }

  async function loadModels() {
    try {
      const r = await fetch("api/v1/models", { headers: apiKey() ? { Authorization: "Bearer " + apiKey() } : {} });
      if (r.status === 401) $("key-row").hidden = false;  // the list needs the key: ask for it
      if (!r.ok) return;
      const { models } = await r.json();
      modelSelect.replaceChildren(...models.map((m) => new Option(`${m.name} (v${m.versions[m.versions.length - 1]})`, m.name)));
      $("model-row").hidden = models.length < 2;
    } catch (e) { /* the page still works with the server's default model */ }
  }

  // Lung fields (server started with --lungs): where Grad-CAM looks, and the mask's sanity check.
  function showLungs(lungs) {
    const note = $("lungs-note");
    note.hidden = !lungs;
    if (!lungs) return;
    const parts = [];
    if (lungs.summary) parts.push("Grad-CAM: " + lungs.summary + ".");
    if (lungs.error) parts.push(lungs.error);
    else if (!lungs.check_ok) parts.push("Lung check failed (" + lungs.problems.join("; ") +
      "): this image may be unlike the films the model learnt from.");
    note.textContent = parts.join(" ");
    note.classList.toggle("warn", !lungs.check_ok);
  }

  function showBars(probabilities, label) {
    const bars = $("bars");
    bars.replaceChildren();
    for (const [name, p] of Object.entries(probabilities)) {
      const row = document.createElement("div");
      row.className = "bar" + (name === label ? " top" : "");
      row.dataset.class = name;
      const nameEl = document.createElement("span");
      nameEl.className = "name";
      nameEl.textContent = name;
      const track = document.createElement("div");
      track.className = "track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", name);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", p.toFixed(4));
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = (100 * p).toFixed(1) + "%";
      row.append(nameEl, track, value);
      bars.appendChild(row);
    }
  }

  async function predict(file) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    const params = new URLSearchParams();
    if ($("gradcam").checked) params.set("gradcam", "true");
    if (!$("model-row").hidden && modelSelect.value) params.set("model", modelSelect.value);
    const headers = {};
    if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
    setStatus("Analysing " + (file.name || "image") + "…");
    $("result").hidden = true;
    const t0 = performance.now();
    let r;
    try {
      r = await fetch("api/v1/predict?" + params.toString(), { method: "POST", body: form, headers });
    } catch (e) {
      setStatus("Could not reach the server: " + e, true);
      return;
    }
    let body = {};
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 401) {
      $("key-row").hidden = false;
      setStatus("This server needs an API key: enter it above, then choose the image again.", true);
      return;
    }
    if (!r.ok) {
      setStatus("Error " + r.status + ": " + (body.error || r.statusText), true);
      return;
    }
    const outside = body.in_distribution === false;  // the model's out-of-distribution gate
    $("label").textContent = outside ? "none: image outside what the model knows" : body.label;
    $("ood-warning").hidden = !outside;
    $("ood-warning").textContent = outside ? body.warning : "";
    $("bars").hidden = outside;
    $("meta").textContent = `model ${body.model} v${body.version} · server ${body.latency_ms.toFixed(0)} ms · ` +
      `round trip ${(performance.now() - t0).toFixed(0)} ms`;
    showBars(body.probabilities, body.label);
    const preview = $("preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.parentElement.hidden = false;
    preview.onerror = () => { preview.parentElement.hidden = true; };  // DICOM: browsers cannot show it
    preview.src = URL.createObjectURL(file);
    $("overlay-figure").hidden = !body.gradcam_png;
    if (body.gradcam_png) $("overlay").src = "data:image/png;base64," + body.gradcam_png;
    $("overlay-note").hidden = !body.gradcam_error;
    $("overlay-note").textContent = body.gradcam_error || "";
    showLungs(body.lungs);
    $("result").hidden = false;
    setStatus("Done.");
  }

  fileInput.addEventListener("change", () => {
    if (fileInput.files && fileInput.files[0]) predict(fileInput.files[0]);
  });
  $("apikey").addEventListener("change", (e) => { sessionStorage.setItem("covid-cxr-api-key", e.target.value); loadModels(); });
  loadModels();
})();
