/* Darkroom browser UI — the Extras page: upscale one image with the webui's Extras API
 * (POST /sdapi/v1/extra-single-image; upscalers from GET /sdapi/v1/upscalers).
 * Loaded (defer) after extras.js. Images come from a file, a drop, a paste, or the
 * "Send to extras" buttons of results and history (DR.sendToExtras).
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, toast, showError, fillSelect, floatOr, intOr, openLightbox, pixelFit } = DR;

  const U = { dataUrl: null, name: 'image', w: 0, h: 0, seq: 0, upscalers: null, busy: false, resultUrl: null, resultBlob: null };

  // ------------------------------------------------------------------ upscaler lists

  async function loadUpscalers() {
    const list = await api('/sdapi/v1/upscalers');
    U.upscalers = Array.isArray(list) ? list.map((u) => u && u.name).filter((n) => typeof n === 'string') : [];
    const opts = U.upscalers.map((n) => [n, n]);
    const one = $('extras-upscaler-1'), two = $('extras-upscaler-2');
    const keep1 = one.dataset.loaded ? one.value : 'Lanczos';
    fillSelect(one, opts, U.upscalers.includes(keep1) ? keep1 : U.upscalers.find((n) => n !== 'None') || 'None');
    fillSelect(two, U.upscalers.includes('None') ? opts : [['None', 'None'], ...opts], two.value || 'None');
    one.dataset.loaded = '1';
    updateControls();
  }

  // ------------------------------------------------------------------ source image

  const { readAsDataURL, hasFiles } = DR;
  const loadFile = (file) => DR.loadImageFile(file, setSource);

  async function setSource(url, name) {
    const seq = ++U.seq;
    const probe = new Image();
    probe.src = url;
    try {
      await probe.decode();
    } catch (e) {
      throw new Error(`${name}: not a readable image; use a PNG, JPEG or WebP`);
    }
    if (seq !== U.seq) return;
    Object.assign(U, { dataUrl: url, name: String(name).replace(/\.[a-z0-9]+$/i, '') || 'image',
      w: probe.naturalWidth, h: probe.naturalHeight });
    const img = $('extras-source');
    img.src = url;
    img.alt = `Image to upscale, ${U.w}×${U.h}`;
    img.hidden = false;
    $('extras-source-info').textContent = `${name} · ${U.w}×${U.h}`;
    $('extras-source-info').hidden = false;
    $('extras-hint').hidden = true;
    $('extras-remove').hidden = false;
    $('extras-pick').textContent = 'Replace image…';
    $('extras-drop').classList.add('loaded');
    updateControls();
  }

  function removeSource() {
    U.seq++;
    Object.assign(U, { dataUrl: null, name: 'image', w: 0, h: 0 });
    $('extras-source').removeAttribute('src');
    $('extras-source').hidden = true;
    $('extras-source-info').hidden = true;
    $('extras-hint').hidden = false;
    $('extras-remove').hidden = true;
    $('extras-pick').textContent = 'Choose image…';
    $('extras-drop').classList.remove('loaded');
    updateControls();
  }

  /** "Send to extras" (results, history): fetch the image, make it the source and show the page. */
  async function sendToExtras(url, name = 'image') {
    try {
      const res = await fetch(url, { credentials: 'same-origin' });
      if (!res.ok) throw new Error(`could not load the image (HTTP ${res.status})`);
      const dataUrl = await readAsDataURL(await res.blob());
      DR.showPage('extras');
      await setSource(dataUrl, name);
      toast('Image sent to extras');
    } catch (e) {
      showError(e.message === 'Failed to fetch' ? new Error('server unreachable') : e);
    }
  }

  // ------------------------------------------------------------------ controls

  const mode = () => ($('extras-mode-to').checked ? 1 : 0);

  function setVisibility(v, from) {
    const x = Math.min(1, Math.max(0, floatOr(v, 0)));
    if (from !== 'range') $('extras-visibility').value = String(x);
    if (from !== 'number') $('extras-visibility-value').value = x.toFixed(2);
  }

  function updateControls() {
    const to = mode() === 1;
    $('extras-by-field').hidden = to;
    $('extras-to-fields').hidden = !to;
    const second = $('extras-upscaler-2').value && $('extras-upscaler-2').value !== 'None';
    $('extras-visibility').disabled = !second;
    $('extras-visibility-value').disabled = !second;
    const s = floatOr($('extras-scale').value, 0);
    $('extras-target').textContent = U.w && s > 0 ? `(${U.w}×${U.h} → ${Math.round(U.w * s)}×${Math.round(U.h * s)})` : '';
  }

  /** The webui's ExtrasSingleImageRequest. Throws an Error to show when the form is not usable. */
  function readRequest() {
    if (!U.dataUrl) throw new Error('Extras: choose an image to upscale first');
    const req = {
      image: U.dataUrl,
      resize_mode: mode(),
      upscaler_1: $('extras-upscaler-1').value || 'None',
      upscaler_2: $('extras-upscaler-2').value || 'None',
      extras_upscaler_2_visibility: Math.min(1, Math.max(0, floatOr($('extras-visibility').value, 0))),
      show_extras_results: true,
    };
    if (req.resize_mode === 0) {
      req.upscaling_resize = floatOr($('extras-scale').value, 2);
    } else {
      req.upscaling_resize_w = intOr($('extras-width').value, 512);
      req.upscaling_resize_h = intOr($('extras-height').value, 512);
      req.upscaling_crop = $('extras-crop').checked;
    }
    return req;
  }

  function setBusy(on, text) {
    U.busy = on;
    const btn = $('extras-run');
    btn.disabled = on;
    btn.textContent = on ? 'Upscaling…' : 'Upscale';
    $('extras-output').setAttribute('aria-busy', String(on));
    $('extras-output').classList.toggle('busy', on);
    const status = $('extras-status');
    status.classList.remove('error-text');
    if (text !== undefined) status.textContent = text;
  }

  /** The response's html_info as plain text (DOMParser runs no scripts and loads nothing). */
  function htmlToText(html) {
    if (!html) return '';
    const doc = new DOMParser().parseFromString(String(html).replace(/<br\s*\/?>\s*/gi, '\n'), 'text/html');
    return (doc.body.textContent || '').trim();
  }

  function base64ToBlob(b64, type) {
    const raw = atob(String(b64).replace(/^data:[^,]*,/, ''));
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  async function run() {
    if (U.busy) return;
    let req;
    try {
      req = readRequest();
    } catch (e) {
      showError(e);
      return;
    }
    const how = req.resize_mode === 0 ? `×${req.upscaling_resize}` : `to ${req.upscaling_resize_w}×${req.upscaling_resize_h}`;
    setBusy(true, `Upscaling ${U.w}×${U.h} ${how} with ${req.upscaler_1}…`);
    const t0 = Date.now();
    try {
      const res = await api('/sdapi/v1/extra-single-image', { method: 'POST', json: req });
      if (!res || typeof res.image !== 'string' || !res.image) throw new Error('the server returned no image');
      const blob = base64ToBlob(res.image, 'image/png');
      if (U.resultUrl) URL.revokeObjectURL(U.resultUrl);
      U.resultUrl = URL.createObjectURL(blob);
      U.resultBlob = blob;
      const img = $('extras-image');
      img.src = U.resultUrl;
      await img.decode().catch(() => null);
      $('extras-size').textContent = `${img.naturalWidth}×${img.naturalHeight} px · ${(blob.size / 1024).toFixed(0)} KB`;
      img.alt = `Upscaled image, ${img.naturalWidth}×${img.naturalHeight}`;
      $('extras-info').textContent = htmlToText(res.html_info);
      $('extras-info').hidden = !$('extras-info').textContent;
      const dl = $('extras-download');
      dl.href = U.resultUrl;
      dl.download = `${U.name}-upscaled.png`;
      $('extras-result').hidden = false;
      pixelFit(img, { maxScale: 4, maxVh: 0.75 });
      setBusy(false, `Done · ${img.naturalWidth}×${img.naturalHeight} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    } catch (e) {
      setBusy(false, '');
      $('extras-status').textContent = `Error: ${e.message}`;
      $('extras-status').classList.add('error-text');
      showError(e);
    }
  }

  // ------------------------------------------------------------------ wiring

  DR.pageHooks.extras = () => loadUpscalers(); // files added to the upscaler folder show up on the next visit

  $('extras-form').addEventListener('submit', (e) => { e.preventDefault(); run(); });
  $('extras-file').addEventListener('change', () => {
    const f = $('extras-file').files[0];
    $('extras-file').value = ''; // the same file again fires 'change' again
    loadFile(f);
  });
  $('extras-pick').addEventListener('click', () => $('extras-file').click());
  $('extras-remove').addEventListener('click', removeSource);
  for (const id of ['extras-mode-by', 'extras-mode-to', 'extras-upscaler-2', 'extras-scale']) {
    $(id).addEventListener('change', updateControls);
    $(id).addEventListener('input', updateControls);
  }
  $('extras-visibility').addEventListener('input', () => setVisibility($('extras-visibility').value, 'range'));
  $('extras-visibility-value').addEventListener('input', () => setVisibility($('extras-visibility-value').value, 'number'));
  $('extras-visibility-value').addEventListener('change', () => setVisibility($('extras-visibility-value').value));

  const drop = $('extras-drop');
  DR.fileDropZone(drop, loadFile);
  drop.addEventListener('click', (e) => {
    if (!U.dataUrl && (e.target === drop || e.target === $('extras-hint'))) $('extras-file').click();
  });
  // an image dropped anywhere else on the Extras page, or pasted there, becomes the source
  window.addEventListener('drop', (e) => {
    if (!hasFiles(e) || DR.currentPage !== 'extras') return;
    e.preventDefault();
    loadFile(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    if (DR.currentPage !== 'extras' || !e.clipboardData) return;
    const f = [...e.clipboardData.files].find((x) => /^image\//.test(x.type));
    if (f) { e.preventDefault(); loadFile(f); }
  });

  $('extras-image').addEventListener('click', () => { if (U.resultUrl) openLightbox(U.resultUrl); });
  $('extras-image').addEventListener('keydown', (e) => { if (e.key === 'Enter' && U.resultUrl) openLightbox(U.resultUrl); });
  $('extras-again').addEventListener('click', async () => {
    if (!U.resultBlob) return;
    try {
      const dataUrl = await readAsDataURL(U.resultBlob); // (fetch would need blob: in connect-src)
      await setSource(dataUrl, `${U.name}-upscaled`);
      $('extras-drop').scrollIntoView({ block: 'nearest' });
    } catch (e) { showError(e); }
  });
  $('history-send-extras').addEventListener('click', () => {
    const url = DR.currentHistoryUrl ? DR.currentHistoryUrl() : null;
    if (!url) return;
    if (DR.closeDetail) DR.closeDetail();
    sendToExtras(url);
  });

  updateControls();
  Object.assign(DR, { sendToExtras });
})();
