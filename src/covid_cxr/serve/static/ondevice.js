// In-browser mode: classify with the bundle's model.onnx in onnxruntime-web (WASM); the image never leaves
// this machine. The pixels are prepared exactly as covid_cxr.data.decode prepares them on the server
// (PIL's box reduce, ITU-R 601 luma, PIL's antialiased bilinear resize in float32), so both answer alike.
// A colour JPEG's luma is its own Y plane, as the server's libjpeg gives it (Image.draft("L")), read
// through WebCodecs' ImageDecoder where the browser offers it; recomputing luma from the decoded RGB
// is up to 4 grey levels off where the RGB was clipped at 0 or 255.
(function () {
  "use strict";
  const REDUCING_GAP = 3.0;  // data/decode.py: no box reduce below 3 x the model's input size
  const sessions = new Map();  // "name/version" -> Promise<InferenceSession>

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error("could not load " + src));
      document.head.appendChild(s);
    });
  }

  async function runtime(spec) {
    if (!window.ort) await loadScript(spec.runtime_url + "ort.wasm.min.js");
    ort.env.wasm.wasmPaths = new URL(spec.runtime_url, document.baseURI).href;  // our server, never a CDN
    ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation; one thread answers the same
    return ort;
  }

  function session(spec, headers) {
    const key = spec.name + "/" + spec.version;
    if (!sessions.has(key)) {
      sessions.set(key, (async () => {
        const ortLib = await runtime(spec);
        const r = await fetch(spec.onnx_url, { headers });
        if (!r.ok) throw new Error("could not fetch the model (" + r.status + ")");
        return ortLib.InferenceSession.create(new Uint8Array(await r.arrayBuffer()), { executionProviders: ["wasm"] });
      })());
      sessions.get(key).catch(() => sessions.delete(key));  // a failed load is tried again next time
    }
    return sessions.get(key);
  }

  function isDicom(bytes, name) {
    return /\.(dcm|dicom)$/i.test(name || "") ||
      (bytes.length > 132 && String.fromCharCode(...bytes.subarray(128, 132)) === "DICM");
  }

  // The file's pixels as the browser decodes them: RGBA bytes, no colour management, EXIF orientation
  // applied (PIL: exif_transpose), transparency composited over black (decode.py: alpha over black).
  async function rgba(file) {
    const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", imageOrientation: "from-image" });
    const { width, height } = bitmap;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true, alpha: false });
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return { data: ctx.getImageData(0, 0, width, height).data, width, height, channels: 4 };
  }

  const YUV = new Set(["I420", "I420A", "I422", "I422A", "I444", "I444A", "NV12"]);  // Y plane first

  // A JPEG's Y plane (8-bit luma, as libjpeg decodes it to grayscale), or null where this browser cannot
  // give it: no WebCodecs (an insecure http:// origin), a frame in RGB (CMYK, some grayscale JPEGs), or an
  // EXIF rotation or flip (then the RGB route, which applies it).
  async function jpegLuma(file, head) {
    if (!(head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) || typeof ImageDecoder === "undefined") return null;
    let frame;
    try {
      const decoder = new ImageDecoder({ data: await file.arrayBuffer(), type: "image/jpeg" });
      frame = (await decoder.decode()).image;
      decoder.close();
      if (!YUV.has(frame.format) || frame.rotation || frame.flip) return null;
      const rect = frame.visibleRect, buf = new Uint8Array(frame.allocationSize());
      const { offset, stride } = (await frame.copyTo(buf))[0];
      const width = rect.width, height = rect.height, data = new Uint8Array(width * height);
      for (let y = 0; y < height; y++) {
        const row = offset + (y + rect.y) * stride + rect.x;
        data.set(buf.subarray(row, row + width), y * width);
      }
      return { data, width, height, channels: 1 };
    } catch (e) {
      return null;  // the RGB route below says what is wrong with the file, if anything
    } finally {
      if (frame) frame.close();
    }
  }

  // PIL's Image.reduce(k) on 8-bit channels (Reduce.c): per box, the rounded mean with PIL's fixed-point
  // arithmetic; boxes cut by the right or bottom edge average the pixels they have.
  function reduce(img, k) {
    const { data, width, height, channels } = img;
    const ow = Math.ceil(width / k), oh = Math.ceil(height / k), out = new Uint8ClampedArray(ow * oh * channels);
    for (let oy = 0; oy < oh; oy++) {
      const y0 = oy * k, y1 = Math.min(y0 + k, height);
      for (let ox = 0; ox < ow; ox++) {
        const x0 = ox * k, x1 = Math.min(x0 + k, width), n = (y1 - y0) * (x1 - x0);
        const amend = Math.floor(n / 2), multiplier = Math.trunc(Math.fround(4294967296 / Math.fround(256 * n)));
        for (let c = 0; c < channels; c++) {
          let ss = amend;
          for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) ss += data[(y * width + x) * channels + c];
          out[(oy * ow + ox) * channels + c] = Math.floor(ss * multiplier / 16777216);
        }
      }
    }
    return { data: out, width: ow, height: oh, channels };
  }

  // PIL's convert("L") (ITU-R 601-2 luma in 16-bit fixed point), then / 255 in float32.
  function gray(img) {
    const { data, width, height } = img, out = new Float32Array(width * height);
    if (img.channels === 1) {  // already luma (a JPEG's Y plane)
      for (let i = 0; i < out.length; i++) out[i] = data[i] / 255;
      return out;
    }
    for (let i = 0; i < out.length; i++) {
      const l = (data[4 * i] * 19595 + data[4 * i + 1] * 38470 + data[4 * i + 2] * 7471 + 0x8000) >>> 16;
      out[i] = l / 255;
    }
    return out;
  }

  // Resample.c's precompute_coeffs for the bilinear (triangle) filter, antialiased when shrinking.
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize, filterscale = Math.max(scale, 1.0), support = filterscale;
    const ksize = Math.ceil(support) * 2 + 1, bounds = new Int32Array(outSize * 2);
    const kk = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale, ss = 1.0 / filterscale;
      const xmin = Math.max(0, Math.trunc(center - support + 0.5));
      const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) {
        const t = Math.abs((x + xmin - center + 0.5) * ss), w = t < 1.0 ? 1.0 - t : 0.0;
        kk[xx * ksize + x] = w;
        ww += w;
      }
      if (ww !== 0.0) for (let x = 0; x < xmax; x++) kk[xx * ksize + x] /= ww;
      bounds[2 * xx] = xmin;
      bounds[2 * xx + 1] = xmax;
    }
    return { ksize, bounds, kk };
  }

  // One pass of PIL's float32 resample (double accumulator, float32 result): along x when `horizontal`.
  function pass(src, w, h, outSize, horizontal) {
    const { ksize, bounds, kk } = coefficients(horizontal ? w : h, outSize);
    const ow = horizontal ? outSize : w, oh = horizontal ? h : outSize, out = new Float32Array(ow * oh);
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        const i = horizontal ? x : y, min = bounds[2 * i], n = bounds[2 * i + 1];
        let ss = 0.0;
        for (let j = 0; j < n; j++) {
          ss += (horizontal ? src[y * w + min + j] : src[(min + j) * w + x]) * kk[i * ksize + j];
        }
        out[y * ow + x] = ss;
      }
    }
    return out;
  }

  function resize(pixels, w, h, width, height) {
    let out = pixels;
    if (w !== width) out = pass(out, w, h, width, true);  // PIL: horizontal first, then vertical
    if (h !== height) out = pass(out, width, h, height, false);
    return out;
  }

  // decode.py's load_for_model for PNG and JPEG: H x W float32 in [0, 1] at the model's input size.
  async function prepare(file, spec) {
    const bytes = new Uint8Array(await file.slice(0, 132).arrayBuffer());
    if (isDicom(bytes, file.name)) {
      throw new Error("DICOM files are not read in the browser (no JS reader applies the modality and VOI " +
        "LUTs as the server does): use server mode ('On the server') for .dcm files");
    }
    let img = await jpegLuma(file, bytes);
    if (!img) {
      try { img = await rgba(file); } catch (e) { throw new Error("not a PNG or JPEG image this browser can read"); }
    }
    if (img.width * img.height > spec.max_pixels) {
      throw new Error(`too many pixels: ${img.width}x${img.height} > ${spec.max_pixels}`);
    }
    const k = Math.max(1, Math.floor(Math.min(img.width, img.height) / (REDUCING_GAP * Math.max(spec.height, spec.width))));
    if (k > 1) img = reduce(img, k);
    return resize(gray(img), img.width, img.height, spec.width, spec.height);
  }

  // schema.decide: the operating point's class when its probability reaches the threshold, else the argmax.
  function decide(probs, spec) {
    let idx = 0;
    for (let i = 1; i < probs.length; i++) if (probs[i] > probs[idx]) idx = i;
    const op = spec.operating_point;
    if (op) {
      const j = spec.classes.indexOf(op.class_name);
      if (j >= 0 && probs[j] >= op.threshold) idx = j;
    }
    return idx;
  }

  // The answer in the upload API's shape: label (null when the gate rejects), probabilities, gate.
  async function classify(file, spec, headers) {
    const pixels = await prepare(file, spec);
    const sess = await session(spec, headers);
    const input = new ort.Tensor("float32", pixels, [1, spec.height, spec.width, 1]);
    const out = await sess.run({ image: input });
    const probs = Array.from(out.probabilities.data);
    const result = {
      model: spec.name, version: spec.version, label: spec.classes[decide(probs, spec)],
      probabilities: Object.fromEntries(spec.classes.map((c, i) => [c, probs[i]])),
    };
    if (spec.gate) {
      result.ood_score = out.ood_score.data[0];
      result.in_distribution = out.in_distribution.data[0] > 0.5;
      if (!result.in_distribution) { result.label = null; result.warning = spec.warning; }
    }
    return result;
  }

  window.covidCxrOnDevice = { classify, prepare };
})();
