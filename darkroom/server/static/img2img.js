/* Darkroom browser UI — img2img and inpainting: the mode switch, the source image
 * (file, drop, paste, "Send to img2img") and the mask editor.
 * Loaded (defer) after app.js, jobs.js and gallery.js; adds its fields to the request
 * through DR.formExtensions (see app.js's readForm).
 *
 * The mask is kept as a list of strokes in the source image's pixel coordinates, so it
 * can be redrawn at any display size (window resize, phone rotation), undone stroke by
 * stroke, and exported at the image's natural size. What is on screen is a canvas the
 * size of the displayed image (times devicePixelRatio) over the <img>: the strokes in
 * white, shown semi-transparent (app.css), plus an outline of the brush under the pointer.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, toast, showError, saveSoon, floatOr, intOr } = DR;

  const I = {
    mode: 'txt2img',
    dataUrl: null,    // the source image as a data: URL (what is sent as init_image)
    nw: 0, nh: 0,     // its natural size
    strokes: [],      // {erase, size (image px), pts: [[x, y], ...]} or {clear: true}
    current: null,    // the stroke being drawn
    pointerId: null,
    hover: null,      // [x, y] in canvas px: where the brush outline is drawn
    erase: false,
    sizes: { txt2img: { w: '', h: '' }, img2img: { w: '', h: '' } }, // each mode keeps its own size fields
    seq: 0,           // ignores a slow image load superseded by a newer one
  };
  const canvas = $('mask-canvas');
  const layer = document.createElement('canvas'); // the strokes alone, at the display canvas's size

  // ------------------------------------------------------------------ mode

  function setMode(mode) {
    if (mode !== 'img2img') mode = 'txt2img';
    $('mode-' + mode).checked = true;
    if (mode === I.mode) return;
    I.sizes[I.mode] = { w: $('width').value, h: $('height').value };
    I.mode = mode;
    $('width').value = I.sizes[mode].w;
    $('height').value = I.sizes[mode].h;
    const img2img = mode === 'img2img';
    $('img2img-panel').hidden = !img2img;
    $('hires-section').parentElement.hidden = img2img; // with its Enable box; the webui's img2img has no hires fix either
    $(img2img ? 'denoise-slot-img2img' : 'denoise-slot-hires').append($('denoise-field'));
    document.body.classList.toggle('img2img-mode', img2img);
    DR.updateSizePlaceholders();
    DR.syncPreset();
    if (img2img) requestAnimationFrame(fit);
    saveSoon();
  }
  DR.isImg2img = () => I.mode === 'img2img';
  DR.sizeSource = () => (I.mode === 'img2img' ? { w: I.nw, h: I.nh } : null);

  // ------------------------------------------------------------------ source image

  const { readAsDataURL } = DR;
  const loadFile = (file) => DR.loadImageFile(file, setImage);

  /** Show `url` (a data: URL) as the source image; a new image starts with an empty mask. */
  async function setImage(url, name) {
    const seq = ++I.seq;
    const probe = new Image();
    probe.src = url;
    try {
      await probe.decode();
    } catch (e) {
      throw new Error(`${name}: not a readable image; use a PNG, JPEG or WebP`);
    }
    if (seq !== I.seq) return;
    I.dataUrl = url;
    I.nw = probe.naturalWidth;
    I.nh = probe.naturalHeight;
    I.strokes = [];
    I.current = null;
    I.pointerId = null;
    $('img2img-image').src = url;
    $('img2img-image').alt = `Source image ${I.nw}×${I.nh}`;
    $('mask-frame').hidden = false;
    $('mask-tools').hidden = false;
    $('img2img-remove').hidden = false;
    $('img2img-pick').textContent = 'Replace image…';
    $('img2img-hint').hidden = true;
    $('img2img-drop').classList.add('loaded');
    setMode('img2img');
    // the source's own size is the default: clear the fields (the placeholders show it)
    $('width').value = '';
    $('height').value = '';
    DR.updateSizePlaceholders();
    DR.syncPreset();
    renderLayer(); // the old image's strokes go (fit only redraws when the size changes)
    composite();
    updateTools();
    requestAnimationFrame(fit);
  }

  function removeImage() {
    I.seq++;
    I.dataUrl = null;
    I.nw = I.nh = 0;
    I.strokes = [];
    $('img2img-image').removeAttribute('src');
    layer.getContext('2d').clearRect(0, 0, layer.width, layer.height);
    $('mask-frame').hidden = true;
    $('mask-tools').hidden = true;
    $('img2img-remove').hidden = true;
    $('img2img-pick').textContent = 'Choose image…';
    $('img2img-hint').hidden = false;
    $('img2img-drop').classList.remove('loaded');
    DR.updateSizePlaceholders();
    updateTools();
  }

  /** "Send to img2img" / "Send to inpaint" (results, lightbox, history, a dragged result): fetch the
   *  image and make it the source; `inpaint` points at the mask brush. */
  async function sendToImg2img(url, { inpaint = false } = {}) {
    try {
      const res = await fetch(url, { credentials: 'same-origin' });
      if (!res.ok) throw new Error(`could not load the image (HTTP ${res.status})`);
      const dataUrl = await readAsDataURL(await res.blob());
      if (DR.currentPage !== 'generate') DR.showPage('generate');
      await setImage(dataUrl, 'image');
      toast(inpaint ? 'Image sent to inpaint: paint over the area to repaint' : 'Image sent to img2img');
      const still = window.matchMedia('(prefers-reduced-motion: reduce)').matches;
      $(inpaint ? 'mask-tools' : 'img2img-panel').scrollIntoView({ behavior: still ? 'auto' : 'smooth', block: 'nearest' });
      if (inpaint) $('mask-brush').focus({ preventScroll: true });
    } catch (e) {
      showError(e.message === 'Failed to fetch' ? new Error('server unreachable') : e);
    }
  }

  /** "Use these settings" on an img2img result of this page: its source image and mask come back too. */
  async function restoreInit({ image, mask }) {
    try {
      const size = [$('width').value, $('height').value]; // the restored settings' size, which setImage clears
      await setImage(image, 'source image');
      if (size.join('x') !== `${I.nw}x${I.nh}` && size.every((v) => v !== '')) { // a resize the job asked for
        [$('width').value, $('height').value] = size;
        DR.updateSizePlaceholders();
        DR.syncPreset();
      }
      if (!mask) return;
      const m = new Image();
      m.src = mask;
      await m.decode();
      I.strokes.push({ image: m });
      renderLayer();
      composite();
      updateTools();
    } catch (e) {
      showError(e);
    }
  }

  /** "Use these settings" on an img2img History item: its stored source (and mask), fetched as data: URLs
   *  (the request sends the image itself, not a link to it). */
  async function restoreInitFrom(sourceUrl, maskUrl) {
    const load = async (url, what) => {
      const res = await fetch(url, { credentials: 'same-origin' });
      if (!res.ok) throw new Error(`could not load the ${what} of this image (HTTP ${res.status})`);
      return readAsDataURL(await res.blob());
    };
    try {
      const image = await load(sourceUrl, 'source image');
      const mask = maskUrl ? await load(maskUrl, 'mask') : null;
      await restoreInit({ image, mask });
    } catch (e) {
      showError(e.message === 'Failed to fetch' ? new Error('server unreachable') : e);
    }
  }

  /** A result or History image dragged from this page (viewer.js sets its URL), or an image link of this server. */
  function droppedUrl(e) {
    const dt = e.dataTransfer;
    if (!dt) return null;
    const raw = dt.getData(DR.IMAGE_TYPE) || (dt.getData('text/uri-list') || '').split(/\r?\n/).find((l) => l && !l.startsWith('#'));
    if (!raw) return null;
    try {
      const u = new URL(raw, location.href);
      return u.origin === location.origin && u.pathname.startsWith('/api/') ? u.pathname + u.search : null;
    } catch (err) {
      return null;
    }
  }
  const hasImageLink = (e) => e.dataTransfer && [...(e.dataTransfer.types || [])].some((t) => t === DR.IMAGE_TYPE || t === 'text/uri-list');

  // ------------------------------------------------------------------ display

  /* The image fills the frame's width (up to 60% of the window's height), scaled up too:
   * a 128 px image is painted on at a usable size. The canvas follows the image's box. */
  function fit() {
    if (!I.nw || $('img2img-panel').hidden || $('mask-frame').hidden) return;
    const frame = $('mask-frame');
    const W = frame.clientWidth;
    if (!W) return;
    const H = Math.max(220, window.innerHeight * 0.6);
    const scale = Math.min(W / I.nw, H / I.nh);
    const w = Math.max(1, Math.floor(I.nw * scale)), h = Math.max(1, Math.floor(I.nh * scale));
    const img = $('img2img-image');
    img.style.width = w + 'px';
    img.style.height = h + 'px';
    img.classList.toggle('pixelated', scale >= 2);
    const dpr = Math.min(window.devicePixelRatio || 1, 3);
    const cw = Math.round(w * dpr), ch = Math.round(h * dpr);
    if (canvas.width !== cw || canvas.height !== ch) {
      canvas.width = layer.width = cw;
      canvas.height = layer.height = ch;
      renderLayer();
    }
    composite();
  }

  function drawStroke(ctx, s, sx, sy, from = 0) {
    const pts = s.pts;
    ctx.save();
    ctx.setTransform(sx, 0, 0, sy, 0, 0);
    ctx.globalCompositeOperation = s.erase ? 'destination-out' : 'source-over';
    ctx.strokeStyle = ctx.fillStyle = '#fff';
    ctx.lineWidth = s.size;
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    if (pts.length === 1) {
      ctx.beginPath();
      ctx.arc(pts[0][0], pts[0][1], s.size / 2, 0, Math.PI * 2);
      ctx.fill();
    } else {
      ctx.beginPath();
      const start = Math.max(0, from - 1);
      ctx.moveTo(pts[start][0], pts[start][1]);
      for (let i = start + 1; i < pts.length; i++) ctx.lineTo(pts[i][0], pts[i][1]);
      ctx.stroke();
    }
    ctx.restore();
  }

  function renderStrokes(ctx, w, h) {
    const sx = w / I.nw, sy = h / I.nh;
    ctx.clearRect(0, 0, w, h);
    for (const s of I.strokes) {
      if (s.clear) ctx.clearRect(0, 0, w, h);
      else if (s.image) ctx.drawImage(s.image, 0, 0, w, h); // a restored mask (white = repaint, as exported)
      else drawStroke(ctx, s, sx, sy);
    }
  }

  function renderLayer() {
    if (I.nw && layer.width) renderStrokes(layer.getContext('2d'), layer.width, layer.height);
  }

  /** The canvas on screen: the strokes (or, inverted, everything but them) and the brush outline. */
  function composite() {
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!I.nw) return;
    if ($('mask-invert').checked) {
      ctx.fillStyle = '#fff';
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.globalCompositeOperation = 'destination-out';
      ctx.drawImage(layer, 0, 0);
      ctx.globalCompositeOperation = 'source-over';
    } else {
      ctx.drawImage(layer, 0, 0);
    }
    // tint the painted area so it shows on light and dark images alike (the export stays white)
    ctx.globalCompositeOperation = 'source-in';
    ctx.fillStyle = '#ff4f2e';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.globalCompositeOperation = 'source-over';
    if (I.hover) {
      const dpr = canvas.width / canvas.getBoundingClientRect().width || 1;
      const r = (brushSize() * dpr) / 2;
      ctx.beginPath();
      ctx.arc(I.hover[0], I.hover[1], Math.max(1, r), 0, Math.PI * 2);
      ctx.lineWidth = 3 * dpr;
      ctx.strokeStyle = '#000';
      ctx.stroke();
      ctx.lineWidth = 1.5 * dpr;
      ctx.strokeStyle = I.erase ? '#f3c77a' : '#fff';
      ctx.stroke();
    }
  }

  // ------------------------------------------------------------------ painting

  const brushSize = () => intOr($('mask-brush').value, 24); // CSS px on screen

  function pointAt(e, rect) {
    const x = ((e.clientX - rect.left) / rect.width) * I.nw;
    const y = ((e.clientY - rect.top) / rect.height) * I.nh;
    return [x, y];
  }
  function hoverAt(e, rect) {
    return [((e.clientX - rect.left) / rect.width) * canvas.width, ((e.clientY - rect.top) / rect.height) * canvas.height];
  }

  canvas.addEventListener('pointerdown', (e) => {
    if (!I.nw || I.pointerId !== null) return;
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    e.preventDefault();
    try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* synthetic pointer: fine without */ }
    const rect = canvas.getBoundingClientRect();
    I.pointerId = e.pointerId;
    I.current = { erase: I.erase, size: (brushSize() * I.nw) / rect.width, pts: [pointAt(e, rect)] };
    I.strokes.push(I.current);
    drawStroke(layer.getContext('2d'), I.current, layer.width / I.nw, layer.height / I.nh);
    I.hover = e.pointerType === 'mouse' ? hoverAt(e, rect) : null;
    composite();
    updateTools();
  });

  canvas.addEventListener('pointermove', (e) => {
    if (!I.nw) return;
    const rect = canvas.getBoundingClientRect();
    if (e.pointerId === I.pointerId && I.current) {
      const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
      const from = I.current.pts.length;
      for (const ev of events.length ? events : [e]) I.current.pts.push(pointAt(ev, rect));
      drawStroke(layer.getContext('2d'), I.current, layer.width / I.nw, layer.height / I.nh, from);
    }
    I.hover = e.pointerType === 'mouse' || e.pointerType === 'pen' ? hoverAt(e, rect) : null;
    composite();
  });

  function endStroke(e) {
    if (e.pointerId !== I.pointerId) return;
    I.pointerId = null;
    I.current = null;
    if (e.type === 'pointercancel') I.hover = null;
    composite();
    updateTools();
  }
  canvas.addEventListener('pointerup', endStroke);
  canvas.addEventListener('pointercancel', endStroke);
  canvas.addEventListener('pointerleave', () => { if (I.pointerId === null) { I.hover = null; composite(); } });
  canvas.addEventListener('contextmenu', (e) => e.preventDefault()); // a long press must not open a menu

  function undo() {
    if (!I.strokes.length || I.pointerId !== null) return;
    I.strokes.pop();
    renderLayer();
    composite();
    updateTools();
  }
  function clearMask() {
    if (!hasPaint()) return;
    I.strokes.push({ clear: true }); // undoable like a stroke
    renderLayer();
    composite();
    updateTools();
  }

  /** Whether anything would be in the mask (a cheap guess: a paint stroke after the last clear). */
  function hasPaint() {
    for (let i = I.strokes.length - 1; i >= 0; i--) {
      if (I.strokes[i].clear) return false;
      if (!I.strokes[i].erase) return true;
    }
    return false;
  }

  function updateTools() {
    $('mask-undo').disabled = !I.strokes.length;
    $('mask-clear').disabled = !hasPaint();
    const eraser = $('mask-eraser');
    eraser.setAttribute('aria-pressed', String(I.erase));
    eraser.classList.toggle('active', I.erase);
    canvas.classList.toggle('erasing', I.erase);
    const inv = $('mask-invert').checked;
    $('mask-info').textContent = !hasPaint()
      ? 'Paint over the image to inpaint that area; with no mask the whole image is redrawn.'
      : inv ? 'Inpainting everything except the painted area.' : 'Inpainting the painted area; the rest is kept.';
  }

  /** The mask at the image's natural size as a PNG data URL; null if nothing is painted.
   * Painted pixels are opaque white, the rest transparent black: white = repaint both for a
   * reader that takes the luminance and for one that takes the alpha channel of an RGBA mask
   * (as the webui's painted layers are read). */
  function exportMask() {
    if (!I.nw || !hasPaint()) return null;
    const c = document.createElement('canvas');
    c.width = I.nw;
    c.height = I.nh;
    const ctx = c.getContext('2d', { willReadFrequently: true });
    renderStrokes(ctx, I.nw, I.nh);
    const data = ctx.getImageData(0, 0, I.nw, I.nh);
    const d = data.data;
    let any = false;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i + 3] >= 128 ? 255 : 0; // the brush's anti-aliased edge: in or out
      if (v) any = true;
      d[i] = d[i + 1] = d[i + 2] = d[i + 3] = v;
    }
    if (!any) return null; // erased away
    ctx.putImageData(data, 0, 0);
    return c.toDataURL('image/png');
  }

  // ------------------------------------------------------------------ denoising strength (shared with hires fix)

  function setDenoise(v, from) {
    const n = Math.min(1, Math.max(0, floatOr(v, 0.75)));
    if (from !== 'range') $('denoise').value = String(n);
    if (from !== 'number') $('denoise-value').value = n.toFixed(2);
  }
  $('denoise').addEventListener('input', () => setDenoise($('denoise').value, 'range'));
  $('denoise-value').addEventListener('input', () => {
    if ($('denoise-value').value.trim() !== '') setDenoise($('denoise-value').value, 'number');
  });
  $('denoise-value').addEventListener('change', () => setDenoise($('denoise-value').value));

  // ------------------------------------------------------------------ form extension

  const INPAINT_FIELDS = [
    ['resize_mode', 'resize-mode', 'int', 0], ['mask_blur', 'mask-blur', 'int', 4],
    ['inpainting_fill', 'masked-content', 'int', 1], ['inpaint_full_res', 'only-masked', 'bool'],
    ['inpaint_full_res_padding', 'only-masked-padding', 'int', 32], ['inpainting_mask_invert', 'mask-invert', 'bool'],
  ];

  DR.formExtensions.push({
    read(req, { submit }) {
      req.denoising_strength = Math.min(1, Math.max(0, floatOr($('denoise').value, 0.75)));
      for (const [key, id, kind, dflt] of INPAINT_FIELDS) {
        req[key] = kind === 'bool' ? $(id).checked : intOr($(id).value, dflt);
      }
      if (!submit) {
        // remembered across reloads: the text-to-image size (a reload starts in that mode)
        if (I.mode === 'img2img') {
          req.width = DR.optInt(I.sizes.txt2img.w);
          req.height = DR.optInt(I.sizes.txt2img.h);
        }
        return;
      }
      if (I.mode !== 'img2img') return;
      if (!I.dataUrl) throw new Error('img2img: choose a source image first (drop, paste or pick a file)');
      req.init_image = I.dataUrl;
      const mask = exportMask();
      if (mask) req.mask = mask;
    },
    apply(req) {
      const has = (k) => req[k] !== undefined && req[k] !== null;
      if (has('denoising_strength')) setDenoise(req.denoising_strength);
      for (const [key, id, kind] of INPAINT_FIELDS) {
        if (!has(key)) continue;
        const box = $(id);
        if (kind === 'bool') box.checked = !!req[key];
        else if (box.tagName !== 'SELECT' || [...box.options].some((o) => o.value === String(req[key]))) box.value = String(req[key]);
      }
      // never an init image: it is not in the request dicts the UI gets back
      updateTools();
      composite();
    },
  });

  // ------------------------------------------------------------------ wiring

  for (const id of ['mode-txt2img', 'mode-img2img']) {
    $(id).addEventListener('change', () => { if ($(id).checked) setMode($(id).value); });
  }
  $('img2img-file').addEventListener('change', () => {
    const f = $('img2img-file').files[0];
    $('img2img-file').value = ''; // the same file again fires 'change' again
    loadFile(f);
  });
  $('img2img-pick').addEventListener('click', () => $('img2img-file').click());
  $('img2img-remove').addEventListener('click', removeImage);
  $('mask-brush').addEventListener('input', () => {
    $('mask-brush-value').textContent = $('mask-brush').value;
    composite();
  });
  $('mask-eraser').addEventListener('click', () => { I.erase = !I.erase; updateTools(); composite(); });
  $('mask-undo').addEventListener('click', undo);
  $('mask-clear').addEventListener('click', clearMask);
  $('mask-invert').addEventListener('change', () => { updateTools(); composite(); });

  const drop = $('img2img-drop');
  const { hasFiles } = DR;
  const takes = (e) => hasFiles(e) || hasImageLink(e);
  drop.addEventListener('dragenter', (e) => { if (takes(e)) { e.preventDefault(); drop.classList.add('over'); } });
  drop.addEventListener('dragover', (e) => { if (takes(e)) { e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; } });
  drop.addEventListener('dragleave', (e) => { if (!drop.contains(e.relatedTarget)) drop.classList.remove('over'); });
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    e.stopPropagation();
    drop.classList.remove('over');
    if (hasFiles(e) && e.dataTransfer.files.length) { loadFile(e.dataTransfer.files[0]); return; }
    const url = droppedUrl(e);
    if (url) sendToImg2img(url);
    else toast('Drop an image file, or a result or History image of this page', 'error');
  });
  // Dragging an image over the Generate tab (e.g. from History) opens the page and the img2img drop zone.
  $('tab-generate').addEventListener('dragenter', (e) => {
    if (!takes(e)) return;
    e.preventDefault();
    if (DR.currentPage !== 'generate') DR.showPage('generate');
    setMode('img2img');
  });
  $('tab-generate').addEventListener('dragover', (e) => { if (takes(e)) e.preventDefault(); });

  // With no image yet, a click anywhere on the empty zone picks a file.
  drop.addEventListener('click', (e) => {
    if (!I.nw && (e.target === drop || e.target === $('img2img-hint'))) $('img2img-file').click();
  });
  // An image dropped anywhere on the Generate page becomes the img2img source.
  window.addEventListener('drop', (e) => {
    if (!hasFiles(e) || DR.currentPage !== 'generate') return;
    e.preventDefault();
    loadFile(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    if (DR.currentPage !== 'generate' || I.mode !== 'img2img' || !e.clipboardData) return;
    const f = [...e.clipboardData.files].find((x) => /^image\//.test(x.type));
    if (f && !e.clipboardData.types.includes('text/plain')) { e.preventDefault(); loadFile(f); }
  });
  document.addEventListener('keydown', (e) => {
    if (I.mode !== 'img2img' || DR.currentPage !== 'generate' || !(e.ctrlKey || e.metaKey) || e.key.toLowerCase() !== 'z' || e.shiftKey) return;
    const t = e.target;
    if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && !['range', 'checkbox', 'radio', 'button'].includes(t.type)))) return;
    e.preventDefault();
    undo();
  });

  if (window.ResizeObserver) new ResizeObserver(() => requestAnimationFrame(fit)).observe($('mask-frame'));
  window.addEventListener('resize', () => requestAnimationFrame(fit));

  $('send-img2img').addEventListener('click', () => {
    const url = DR.currentHistoryUrl ? DR.currentHistoryUrl() : null;
    if (!url) return;
    if (DR.closeDetail) DR.closeDetail();
    sendToImg2img(url);
  });

  // ------------------------------------------------------------------ PNG info -> img2img

  /* The file the PNG info page inspects (seen in the capture phase, before gallery.js resets the input):
   * "Send to img2img" makes it the source image and fills the form from its parameters. */
  let pngFile = null;
  const keepPng = (f) => {
    if (!f) return;
    pngFile = f;
    $('png-send-img2img').disabled = false;
  };
  document.addEventListener('change', (e) => { if (e.target && e.target.id === 'png-file') keepPng(e.target.files[0]); }, true);
  window.addEventListener('drop', (e) => {
    if (DR.currentPage === 'pnginfo' && hasFiles(e)) keepPng(e.dataTransfer.files[0]);
  }, true);
  document.addEventListener('paste', (e) => {
    if (DR.currentPage !== 'pnginfo' || !e.clipboardData) return;
    keepPng([...e.clipboardData.files].find((x) => /^image\//.test(x.type)));
  }, true);
  $('png-send-img2img').addEventListener('click', async () => {
    if (!pngFile) return;
    const form = new FormData();
    form.append('file', pngFile, pngFile.name || 'image.png');
    try {
      const info = await DR.api('/api/png-info', { method: 'POST', form });
      const dataUrl = await readAsDataURL(pngFile);
      if (info && info.request) DR.fillForm(info.request);
      else DR.showPage('generate');
      await setImage(dataUrl, pngFile.name || 'image');
      toast(info && info.request ? 'Image and settings sent to img2img' : 'Image sent to img2img (it has no generation parameters)');
    } catch (e) {
      showError(e);
    }
  });

  Object.assign(DR, { sendToImg2img, setImg2imgMode: setMode, exportMask, restoreInit, restoreInitFrom });
  // for a test or a console: how many strokes, and the source size
  DR.maskState = () => ({ strokes: I.strokes.length, painted: hasPaint(), width: I.nw, height: I.nh });
})();
