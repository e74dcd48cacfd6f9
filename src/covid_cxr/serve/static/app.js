// Classify an X-ray (on the server through /api/v1/predict, or in this browser with ondevice.js) and show
// the label, one bar per class and the Grad-CAM overlay; an image the gate rejects gets no label.
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
      showCardLink();
    } catch (e) { /* the page still works with the server's default model */ }
  }

  // The chosen model's card (intended use, evaluation, limitations): GET api/v1/models/{name}/card.
  function showCardLink() {
    const link = $("card-link"), name = modelSelect.value;
    link.hidden = !name;
    if (name) link.href = "api/v1/models/" + encodeURIComponent(name) + "/card";
  }
  modelSelect.addEventListener("change", showCardLink);

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

  // The site monitor (metadata's site_monitor): a banner when this server's recent images differ
  // from those the model was validated on.
  async function showShift(name, version) {
    const banner = $("shift-banner");
    try {
      const r = await fetch(`v1/models/${encodeURIComponent(name)}/versions/${version}/metadata`,
        { headers: headers() });
      if (!r.ok) return;
      const mon = (await r.json()).metadata.site_monitor;
      banner.hidden = !mon || mon.verdict !== "shift detected";
      if (!banner.hidden) banner.textContent = `Recent images differ from those ${name} was validated on ` +
        `(${mon.n} latest answers, p = ${mon.p_value.toPrecision(2)}): ${mon.summary} Check this site ` +
        "(covid-cxr site check) before trusting its answers.";
    } catch (e) { /* the monitor is advisory: the page works without it */ }
  }


  function headers() { return apiKey() ? { Authorization: "Bearer " + apiKey() } : {}; }

  function chosenModel() { return !$("model-row").hidden && modelSelect.value ? modelSelect.value : null; }

  function onDevice() { return $("mode-device").checked; }

  // Server mode: the file goes to the upload API. Returns the API's answer, or null after saying why not.
  async function predictOnServer(file) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    const params = new URLSearchParams();
    if ($("gradcam").checked) params.set("gradcam", "true");
    if (chosenModel()) params.set("model", chosenModel());
    let r;
    try {
      r = await fetch("api/v1/predict?" + params.toString(), { method: "POST", body: form, headers: headers() });
    } catch (e) {
      setStatus("Could not reach the server: " + e, true);
      return null;
    }
    const body = await answer(r);
    if (body) body.where = `server ${body.latency_ms.toFixed(0)} ms`;
    return body;
  }

  async function answer(r) {
    let body = {};
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 401) {
      $("key-row").hidden = false;
      setStatus("This server needs an API key: enter it above, then choose the image again.", true);
      return null;
    }
    if (!r.ok) {
      setStatus("Error " + r.status + ": " + (body.error || r.statusText), true);
      return null;
    }
    return body;
  }

  // In-browser mode: only the model comes from the server; the image stays on this machine.
  async function deviceSpec() {
    const params = new URLSearchParams();
    if (chosenModel()) params.set("model", chosenModel());
    try {
      return await answer(await fetch("api/v1/browser/model?" + params.toString(), { headers: headers() }));
    } catch (e) {
      setStatus("Could not reach the server for the model: " + e, true);
      return null;
    }
  }

  async function predictOnDevice(file) {
    const spec = await deviceSpec();
    if (!spec) return null;
    if (spec.unavailable) {
      setStatus("In-browser mode unavailable: " + spec.unavailable + ".", true);
      return null;
    }
    const t0 = performance.now();
    try {
      const body = await window.covidCxrOnDevice.classify(file, spec, headers());
      body.where = `in this browser, image not sent · ${(performance.now() - t0).toFixed(0)} ms`;
      return body;
    } catch (e) {
      setStatus("Error: " + (e && e.message ? e.message : e), true);
      return null;
    }
  }

  async function predict(file) {
    setStatus("Analysing " + (file.name || "image") + (onDevice() ? " in this browser…" : "…"));
    $("result").hidden = true;
    const t0 = performance.now();
    const body = onDevice() ? await predictOnDevice(file) : await predictOnServer(file);
    if (!body) return;
    show(body, file, `model ${body.model} v${body.version} · ${body.where} · ` +
      `round trip ${(performance.now() - t0).toFixed(0)} ms`);
  }

  function show(body, file, meta) {
    const outside = body.in_distribution === false;  // the model's out-of-distribution gate: no label
    $("label").textContent = outside ? "none: image outside what the model knows" : body.label;
    $("ood-warning").hidden = !outside;
    $("ood-warning").textContent = outside ? body.warning : "";
    $("bars").hidden = outside;
    $("meta").textContent = meta;
    showBars(body.probabilities, outside ? null : body.label);
    $("result").dataset.answer = JSON.stringify(body);  // full precision, for whoever asks (and the tests)
    const preview = $("preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.parentElement.hidden = false;
    preview.onerror = () => { preview.parentElement.hidden = true; };  // DICOM: browsers cannot show it
    preview.src = URL.createObjectURL(file);
    $("overlay-figure").hidden = !body.gradcam_png;
    if (body.gradcam_png) $("overlay").src = "data:image/png;base64," + body.gradcam_png;
    const note = body.gradcam_error || ($("gradcam").checked && onDevice() ? "Grad-CAM needs server mode." : "");
    $("overlay-note").hidden = !note;
    $("overlay-note").textContent = note;
    showLungs(body.lungs);
    showShift(body.model, body.version);
    $("result").hidden = false;
    setStatus("Done.");
  }

  function showMode() {
    $("mode-note").textContent = onDevice()
      ? "The image stays on this machine: only the model is downloaded. DICOM is not read in the browser " +
        "(use server mode for .dcm files); Grad-CAM and the lung check need server mode."
      : "The image is sent to this server, analysed and not stored.";
  }

  fileInput.addEventListener("change", () => {
    if (fileInput.files && fileInput.files[0]) predict(fileInput.files[0]);
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showMode);
  showMode();
  $("apikey").addEventListener("change", (e) => { sessionStorage.setItem("covid-cxr-api-key", e.target.value); loadModels(); });
  loadModels();
})();
