/* Darkroom browser UI — core + Generate form.
 *
 * Plain ES2020, no build step, no dependencies. Works under a strict CSP
 * (no inline scripts/styles): all styling is via classes in app.css.
 * jobs.js (submit, live progress, results) and gallery.js (History, PNG info,
 * Models) build on the helpers exported here as window.Darkroom.
 */
'use strict';

(() => {
  const DR = (window.Darkroom = window.Darkroom || {});
  const $ = (id) => document.getElementById(id);
  const STORE_KEY = 'darkroom.form.v1';

  /** Tiny element builder: el('p', {className: 'x'}, 'text', child). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k in node) node[k] = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined && c !== false) node.append(c);
    return node;
  }

  // ------------------------------------------------------------------ JSON / API

  /* Seeds may be 64-bit (ComfyUI). JSON.parse would round them to doubles, so
   * where the browser exposes the source text to revivers we keep big seeds as
   * digit strings; they are written back verbatim by jsonBody(). */
  function parseJSON(text) {
    return JSON.parse(text, function (key, value, ctx) {
      if (key === 'seed' && typeof value === 'number' && !Number.isSafeInteger(value) && ctx && ctx.source) {
        return ctx.source;
      }
      return value;
    });
  }

  function jsonBody(obj) {
    if (typeof obj.seed === 'string' && /^-?\d+$/.test(obj.seed)) {
      const digits = obj.seed;
      const s = JSON.stringify({ ...obj, seed: '\u0000SEED\u0000' });
      return s.replace('"seed":"\\u0000SEED\\u0000"', '"seed":' + digits);
    }
    return JSON.stringify(obj);
  }

  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  /** The DR-... code of an error body (ours: data.code; OpenAI's shape: data.error.code), for its help page. */
  function errorCode(data) {
    const code = data && (typeof data.code === 'string' ? data.code : data.error && data.error.code);
    return typeof code === 'string' && /^DR(-[A-Z0-9]+)+$/.test(code) ? code : undefined;
  }

  /** Pull a one-line message out of any error body (ours, FastAPI's or plain text). */
  function errorMessage(data, text, res) {
    if (res.status === 401) return 'Access token required: open the URL printed by `darkroom serve`';
    if (data && typeof data.error === 'string') return data.error;
    if (data && data.detail) {
      if (typeof data.detail === 'string') return data.detail;
      if (Array.isArray(data.detail)) {
        return data.detail.map((d) => (d.loc ? d.loc.filter((p) => p !== 'body').join('.') + ': ' : '') + (d.msg || '')).join('; ');
      }
    }
    const plain = (text || '').replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ').trim().slice(0, 200);
    return `HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}${plain ? ': ' + plain : ''}`;
  }

  /** fetch wrapper: api(path, {method, json, form, headers}) → parsed JSON, or throws ApiError. */
  async function api(path, opts = {}) {
    const init = { method: opts.method || 'GET', credentials: 'same-origin',
      headers: { Accept: 'application/json', ...(opts.headers || {}) } };
    if (opts.json !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = jsonBody(opts.json);
    } else if (opts.form) {
      init.body = opts.form; // multipart; the browser sets the boundary header
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      setOnline(false);
      throw new ApiError('server unreachable', 0);
    }
    setOnline(true);
    const text = await res.text();
    let data = null;
    if (text) { try { data = parseJSON(text); } catch (e) { data = null; } }
    if (!res.ok) throw new ApiError(errorMessage(data, text, res), res.status, errorCode(data));
    if (data === null && text) throw new ApiError('unexpected response from server (not JSON)', res.status);
    return data;
  }

  // ------------------------------------------------------------------ notices

  /** Show a toast. kind: 'error' (stays until closed) | 'info' (fades). Same text = one toast.
   * code: an error's DR-... code, linked to its local help page (/docs/errors/CODE). */
  function toast(message, kind = 'info', code = undefined) {
    const box = $('toasts');
    const text = String(message || 'Unknown error');
    for (const t of box.children) {
      if (t.dataset.msg === text) { bumpToast(t); return; }
    }
    const close = el('button', { type: 'button', className: 'toast-close', 'aria-label': 'Dismiss', textContent: '✕' });
    const help = code ? el('a', { className: 'toast-help', href: `/docs/errors/${encodeURIComponent(code)}`,
      target: '_blank', rel: 'noopener', title: `${code}: what it means and how to fix it`, textContent: 'Help' }) : null;
    const t = el('div', { className: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
      el('span', { className: 'toast-msg', textContent: text }), help, close);
    t.dataset.msg = text;
    t.dataset.kind = kind;
    close.addEventListener('click', () => t.remove());
    box.append(t);
    while (box.children.length > 5) box.firstElementChild.remove();
    bumpToast(t);
  }
  function bumpToast(t) {
    clearTimeout(t._timer);
    const ms = t.dataset.kind === 'error' ? 15000 : 3500;
    t._timer = setTimeout(() => t.remove(), ms);
  }
  function showError(err) {
    console.error(err);
    toast(err && err.message ? err.message : String(err), 'error', err && err.code);
  }
  function clearToast(message) {
    for (const t of [...$('toasts').children]) if (t.dataset.msg === message) t.remove();
  }

  // Nothing should fail silently: surface stray exceptions too.
  window.addEventListener('error', (e) => { if (e.message) toast(e.message, 'error'); });
  window.addEventListener('unhandledrejection', (e) => showError(e.reason));

  let online = null;
  function setOnline(ok) {
    if (ok === online) return;
    online = ok;
    const s = $('server-status');
    s.classList.toggle('offline', !ok);
    if (!ok) {
      s.textContent = 'server unreachable';
      toast('server unreachable', 'error');
    } else {
      clearToast('server unreachable');
      if (s.textContent === 'server unreachable') s.textContent = 'connected';
    }
  }

  // ------------------------------------------------------------------ clipboard

  async function copyText(text) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        toast('Copied to clipboard');
        return true;
      }
    } catch (e) { /* fall through to the legacy path */ }
    // Plain-http LAN access has no async clipboard API: use a hidden textarea.
    const ta = el('textarea', { className: 'offscreen', value: text, readOnly: true });
    document.body.append(ta);
    ta.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    ta.remove();
    toast(ok ? 'Copied to clipboard' : 'Copy not available here: select the text and copy it manually', ok ? 'info' : 'error');
    return ok;
  }

  // ------------------------------------------------------------------ routing

  const PAGES = ['generate', 'extras', 'history', 'pnginfo', 'models'];
  DR.pageHooks = DR.pageHooks || {}; // name -> function called when the page is shown

  function route() {
    let page = (location.hash || '').replace(/^#/, '');
    if (!PAGES.includes(page)) page = 'generate';
    for (const p of PAGES) {
      const active = p === page;
      $('page-' + p).hidden = !active;
      const tab = $('tab-' + p);
      tab.classList.toggle('active', active);
      tab.setAttribute('aria-selected', String(active));
    }
    DR.currentPage = page;
    if (DR.syncTabs) DR.syncTabs(); // roving tabindex (a11y.js)
    const hook = DR.pageHooks[page];
    if (hook) Promise.resolve().then(hook).catch(showError);
  }
  function showPage(page) {
    // pushState, not location.hash: a fragment navigation moves the focus off the tab that asked for it
    if (location.hash !== '#' + page) history.pushState(null, '', '#' + page);
    route();
  }

  // ------------------------------------------------------------------ lists (models, samplers, schedules)

  const state = { models: [], samplers: [], schedules: [], lastSeed: null };
  DR.onModels = DR.onModels || []; // callbacks(list) — the Models page registers one

  function fillSelect(select, options, keep) {
    const prev = keep !== undefined ? keep : select.value;
    select.replaceChildren(...options.map(([value, label]) => el('option', { value, textContent: label })));
    if (options.some(([v]) => v === prev)) select.value = prev;
  }

  function currentModelEntry() {
    return state.models.find((m) => m.name === $('model').value) || null;
  }

  function setModels(list) {
    state.models = Array.isArray(list) ? list : [];
    const sel = $('model');
    const cur = state.models.find((m) => m.current);
    if (!state.models.length) {
      sel.replaceChildren(el('option', { value: '', textContent: '(no models found)' }));
    } else {
      fillSelect(sel, state.models.map((m) => [m.name, m.family ? `${m.name} · ${m.family}` : m.name]), cur ? cur.name : sel.value);
    }
    updateSizePlaceholders();
    for (const cb of DR.onModels) cb(state.models);
  }

  async function loadModels() { setModels(await api('/api/models')); }

  async function loadSamplers() {
    state.samplers = await api('/api/samplers');
    fillSelect($('sampler'), state.samplers.map((s) => [s.name, s.name]));
    updateSchedules();
  }
  /** The schedule types the chosen sampler accepts (GET /api/samplers: each sampler's `schedules`,
   *  "Automatic" first); every schedule while the samplers are not known. */
  function allowedSchedules(samplerName) {
    const s = state.samplers.find((x) => x.name === samplerName);
    return s && Array.isArray(s.schedules) && s.schedules.length ? s.schedules : state.schedules;
  }
  /** Refill the schedule list for the current sampler: the chosen schedule stays if the sampler
   *  accepts it, else "Automatic". `want` (a saved or loaded value) is tried first. */
  function updateSchedules(want) {
    const sel = $('schedule');
    const list = allowedSchedules($('sampler').value);
    if (!list.length) return;
    const pick = [want, sel.value].find((v) => v && list.includes(v)) || (list.includes('Automatic') ? 'Automatic' : list[0]);
    fillSelect(sel, list.map((s) => [s, s]), pick);
  }
  /** Few-step presets (docs/few-step.md): choosing one fills sampler, schedule, steps and CFG, which stay editable. */
  async function loadFewStep() {
    state.fewstep = await api('/api/presets');
    fillSelect($('fewstep'), [['', 'Set sampler, steps and CFG for…'],
      ...state.fewstep.map((p) => [p.name, `${p.name}: ${p.description}`])], '');
  }
  function applyFewStep() {
    const p = (state.fewstep || []).find((x) => x.name === $('fewstep').value);
    if (!p) return;
    $('sampler').value = p.sampler;
    updateSchedules(p.schedule);
    $('steps').value = p.steps;
    $('cfg').value = p.cfg_scale;
    $('fewstep').value = '';
    toast(`Preset ${p.name}: ${p.sampler}, ${p.schedule}, ${p.steps} steps, CFG ${p.cfg_scale}`);
    saveSoon();
  }
  async function loadSchedules() {
    state.schedules = await api('/api/schedules');
    updateSchedules();
  }

  /** Switch the server's current model (select box and Models page both use this). */
  async function selectModel(name) {
    const sel = $('model');
    sel.disabled = true;
    toast(`Loading model ${name}…`);
    try {
      setModels(await api('/api/models/select', { method: 'POST', json: { model: name } }));
      clearToast(`Loading model ${name}…`);
      toast(`Model ready: ${name}`);
    } catch (e) {
      clearToast(`Loading model ${name}…`);
      showError(e);
      setModels(state.models); // put the select back on the real current model
    } finally {
      sel.disabled = false;
    }
  }

  // ------------------------------------------------------------------ form

  /** The size presets the select offers now (models.js fits them to the selected model's family). */
  const sizePresets = () => [...$('size-preset').options].map((o) => o.value).filter((v) => /^\d+x\d+$/.test(v));

  /* Empty width/height mean the model's native size, or in img2img mode the source image's:
   * img2img.js sets DR.sizeSource() -> null (txt2img) or {w, h} (0 while no image is loaded). */
  function updateSizePlaceholders() {
    const src = DR.sizeSource ? DR.sizeSource() : null;
    const m = currentModelEntry();
    const ph = m && m.native_size ? String(m.native_size) : 'auto';
    $('width').placeholder = src ? (src.w ? String(src.w) : 'image') : ph;
    $('height').placeholder = src ? (src.h ? String(src.h) : 'image') : ph;
    $('size-preset').options[0].textContent = src ? 'Source image size' : 'Model native size';
    if (DR.fitSizePresets) { DR.fitSizePresets(); syncPreset(); }
    for (const cb of DR.onSize) cb();
  }
  function syncPreset() {
    const w = $('width').value.trim(), h = $('height').value.trim();
    const key = `${w}x${h}`;
    $('size-preset').value = !w && !h ? 'native' : sizePresets().includes(key) ? key : 'custom';
    for (const cb of DR.onSize) cb();
  }

  const intOr = (v, d) => { const n = parseInt(v, 10); return Number.isFinite(n) ? n : d; };
  const floatOr = (v, d) => { const n = parseFloat(v); return Number.isFinite(n) ? n : d; };
  const optInt = (v) => (String(v).trim() === '' ? null : intOr(v, null));

  function readSeed() {
    const raw = $('seed').value.trim();
    if (!/^-?\d+$/.test(raw)) return -1;
    const n = Number(raw);
    return Number.isSafeInteger(n) ? n : raw; // big seed: keep digits exact
  }

  /* Other scripts (img2img.js, extras.js) add their fields through form extensions:
   * {read(req, {submit}), apply(req, notes, {restoring})}. read with submit=false is for
   * localStorage (no images, may add UI-only keys); submit=true builds the POST body and may
   * throw an Error whose message is shown as a toast. */
  DR.formExtensions = DR.formExtensions || [];
  DR.loaders = DR.loaders || []; // async list loaders run by init (VAEs, LoRAs, X/Y axes)
  DR.onSize = DR.onSize || [];   // called when the size fields or their placeholders change

  /** The server's limits (settings max_side, max_batch_size, ...; docs/limits.md) as the inputs' max. */
  async function loadLimits() {
    const s = await api('/api/status');
    const lim = (s && s.limits) || {};
    const inputs = { max_side: ['width', 'height', 'hr-resize-x', 'hr-resize-y'], max_batch_size: ['batch-size'],
      max_batch_count: ['batch-count'], max_steps: ['steps', 'hr-steps'] };
    for (const [name, ids] of Object.entries(inputs)) {
      if (!Number.isSafeInteger(lim[name])) continue;
      for (const id of ids) { const input = $(id); if (input) input.max = String(lim[name]); }
    }
  }
  DR.loaders.push(loadLimits);

  /** The GenerationRequest (+ private flag) described by the form. */
  function readForm(submit = false) {
    const req = {
      prompt: $('prompt').value,
      negative_prompt: $('negative').value,
      sampler: $('sampler').value || 'DPM++ 2M',
      schedule: $('schedule').value || 'Automatic',
      steps: intOr($('steps').value, 20),
      cfg_scale: floatOr($('cfg').value, 7),
      seed: readSeed(),
      width: optInt($('width').value),
      height: optInt($('height').value),
      batch_size: intOr($('batch-size').value, 1),
      n_iter: intOr($('batch-count').value, 1),
      model: $('model').value || null,
      private: $('private').checked,
    };
    for (const ext of DR.formExtensions) ext.read(req, { submit });
    return req;
  }

  function findSampler(name) {
    const n = String(name).toLowerCase();
    const s = state.samplers.find((x) => x.name.toLowerCase() === n || (x.aliases || []).some((a) => String(a).toLowerCase() === n));
    return s ? s.name : null;
  }

  /** Fill the form from a request dict. Returns notes about values that could not be applied. */
  function applyValues(req, { restoring = false } = {}) {
    const notes = [];
    const has = (k) => req[k] !== undefined && req[k] !== null;
    if (req.prompt !== undefined) $('prompt').value = req.prompt || '';
    if (req.negative_prompt !== undefined) $('negative').value = req.negative_prompt || '';
    if (has('steps')) $('steps').value = req.steps;
    if (has('cfg_scale')) $('cfg').value = req.cfg_scale;
    if (has('seed')) $('seed').value = String(req.seed);
    if (req.width !== undefined) $('width').value = req.width == null ? '' : req.width;
    if (req.height !== undefined) $('height').value = req.height == null ? '' : req.height;
    if (has('batch_size')) $('batch-size').value = req.batch_size;
    if (has('n_iter')) $('batch-count').value = req.n_iter;
    if (has('private')) $('private').checked = !!req.private;
    if (has('sampler') && state.samplers.length) {
      const s = findSampler(req.sampler);
      if (s) $('sampler').value = s; else notes.push(`sampler ${req.sampler} not found`);
    }
    if (has('schedule') && state.schedules.length) {
      const s = state.schedules.find((x) => x.toLowerCase() === String(req.schedule).toLowerCase());
      if (!s) notes.push(`schedule ${req.schedule} not found`);
      else if (!allowedSchedules($('sampler').value).includes(s)) notes.push(`schedule ${s} does not go with sampler ${$('sampler').value}`);
      updateSchedules(s);
    } else if (has('sampler')) updateSchedules();
    // On reload the server's current model wins; when loading settings we pick the requested one.
    if (has('model') && !restoring) {
      const m = state.models.find((x) => x.name === req.model || (x.hash && x.hash === req.model));
      if (m) { $('model').value = m.name; updateSizePlaceholders(); } else notes.push(`model ${req.model} not found`);
    }
    for (const ext of DR.formExtensions) ext.apply(req, notes, { restoring });
    syncPreset();
    return notes;
  }

  function showNotes(notes) {
    const n = $('form-note');
    n.textContent = notes.join(' · ');
    n.hidden = !notes.length;
  }

  /** Public: fill the Generate form from a request (history, PNG info, results) and show it. */
  function fillForm(req, { switchPage = true } = {}) {
    if (!req || typeof req !== 'object') { toast('No generation settings to use', 'error'); return; }
    const notes = applyValues(req);
    showNotes(notes);
    saveForm();
    if (switchPage) showPage('generate');
    toast(notes.length ? 'Settings loaded (' + notes.join(', ') + ')' : 'Settings loaded');
    $('prompt').focus({ preventScroll: true });
    window.scrollTo({ top: 0, behavior: 'smooth' });
  }

  /* Remember the form across reloads. A private session keeps its prompts
   * out of localStorage too — only the knobs are remembered. */
  function saveForm() {
    try {
      const v = readForm();
      if (v.private) { delete v.prompt; delete v.negative_prompt; }
      localStorage.setItem(STORE_KEY, jsonBody(v));
    } catch (e) { /* storage disabled or full: not fatal */ }
  }
  function savedForm() {
    try { return parseJSON(localStorage.getItem(STORE_KEY) || 'null'); } catch (e) { return null; }
  }
  let saveTimer = null;
  const saveSoon = () => { clearTimeout(saveTimer); saveTimer = setTimeout(saveForm, 400); };

  // ------------------------------------------------------------------ small images

  /* Small images (the built-in model makes 128×128) are drawn at a whole-number
   * scale with crisp pixels instead of a blurry fractional upscale. The size goes
   * in the img's width/height attributes (the CSP allows no inline styles), the
   * .pixel-fit class turns on image-rendering: pixelated and drops the CSS size
   * rules; images at least SMALL px wide keep their normal fit-to-box sizing.
   * opts: maxScale, maxVh (height limit as a fraction of the window; default:
   * the parent's content height). The scale follows the parent's size. */
  const SMALL = 256;
  const fitOpts = new WeakMap();
  // Resizing an image inside the observer callback would resize what it observes
  // (a loop error), so refits wait for the next frame.
  const fitRO = window.ResizeObserver
    ? new ResizeObserver((entries) => requestAnimationFrame(() => {
      for (const e of entries) for (const img of e.target.children) if (fitOpts.has(img)) applyPixelFit(img);
    }))
    : null;

  function pixelFit(img, opts = {}) {
    const first = !fitOpts.has(img);
    fitOpts.set(img, opts);
    if (first) img.addEventListener('load', () => applyPixelFit(img));
    if (fitRO && img.parentElement) fitRO.observe(img.parentElement);
    applyPixelFit(img);
  }

  function applyPixelFit(img) {
    const opts = fitOpts.get(img) || {};
    const nw = img.naturalWidth, nh = img.naturalHeight, box = img.parentElement;
    let scale = 0;
    if (img.complete && nw && nh && nw < SMALL && box && box.clientWidth) {
      const cs = getComputedStyle(box);
      const w = box.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      const h = opts.maxVh ? window.innerHeight * opts.maxVh
        : box.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom);
      scale = Math.min(opts.maxScale || 4, Math.floor(w / nw), Math.floor(h / nh));
    }
    if (scale >= 2) {
      if (img.width !== nw * scale) img.width = nw * scale;
      if (img.height !== nh * scale) img.height = nh * scale;
      img.classList.add('pixel-fit');
    } else if (img.classList.contains('pixel-fit')) {
      img.classList.remove('pixel-fit');
      img.removeAttribute('width');
      img.removeAttribute('height');
    }
  }

  // ------------------------------------------------------------------ lightbox

  const lb = { urls: [], i: 0, returnFocus: null };
  function openLightbox(urls, i = 0) {
    lb.urls = Array.isArray(urls) ? urls : [urls];
    lb.i = i;
    lb.returnFocus = document.activeElement;
    $('lightbox-img').src = lb.urls[lb.i];
    $('lightbox').hidden = false;
    pixelFit($('lightbox-img'), { maxScale: 16 });
    $('lightbox-close').focus();
  }
  function closeLightbox() {
    if ($('lightbox').hidden) return false;
    $('lightbox').hidden = true;
    $('lightbox-img').removeAttribute('src');
    if (lb.returnFocus && lb.returnFocus.focus) lb.returnFocus.focus();
    return true;
  }
  function stepLightbox(d) {
    if (lb.urls.length < 2) return;
    lb.i = (lb.i + d + lb.urls.length) % lb.urls.length;
    $('lightbox-img').src = lb.urls[lb.i];
  }

  // ------------------------------------------------------------------ wiring

  function bind() {
    for (const p of PAGES) $('tab-' + p).addEventListener('click', () => showPage(p));
    window.addEventListener('hashchange', route);

    // submit, Ctrl+Enter and Interrupt are wired in jobs.js
    $('gen-form').addEventListener('input', saveSoon);
    $('gen-form').addEventListener('change', saveSoon);

    $('model').addEventListener('change', () => {
      updateSizePlaceholders();
      showNotes([]);
      if ($('model').value) selectModel($('model').value);
    });
    $('seed-random').addEventListener('click', () => { $('seed').value = '-1'; saveSoon(); });
    $('seed-reuse').addEventListener('click', () => {
      if (state.lastSeed === null) { toast('No finished image yet'); return; }
      $('seed').value = String(state.lastSeed);
      saveSoon();
    });
    $('fewstep').addEventListener('change', applyFewStep);
    $('sampler').addEventListener('change', () => updateSchedules());
    $('size-preset').addEventListener('change', () => {
      const v = $('size-preset').value;
      if (v === 'native') { $('width').value = ''; $('height').value = ''; }
      else if (v !== 'custom') { const [w, h] = v.split('x'); $('width').value = w; $('height').value = h; }
      syncPreset();
      saveSoon();
    });
    for (const id of ['width', 'height']) $(id).addEventListener('input', syncPreset);
    $('size-swap').addEventListener('click', () => {
      const w = $('width').value;
      $('width').value = $('height').value;
      $('height').value = w;
      syncPreset();
      saveSoon();
    });

    $('lightbox').addEventListener('click', closeLightbox);
    document.addEventListener('keydown', (e) => {
      if (!$('lightbox').hidden) {
        if (e.key === 'Escape') { e.preventDefault(); closeLightbox(); }
        else if (e.key === 'ArrowRight') stepLightbox(1);
        else if (e.key === 'ArrowLeft') stepLightbox(-1);
        return;
      }
      if (e.key === 'Escape' && DR.closeDetail) DR.closeDetail();
    });
  }

  async function init() {
    bind();
    route();
    const saved = savedForm();
    if (saved) applyValues(saved, { restoring: true }); // text fields right away
    // What the user changes while the lists load wins over the second restore below.
    const touched = new Set();
    const mark = (e) => { if (e.isTrusted && e.target && e.target.id) touched.add(e.target); };
    document.addEventListener('input', mark, true);
    document.addEventListener('change', mark, true);
    const results = await Promise.allSettled([loadModels(), loadSamplers(), loadSchedules(), loadFewStep(), DR.refreshStatus(),
      ...DR.loaders.map((f) => f())]);
    document.removeEventListener('input', mark, true);
    document.removeEventListener('change', mark, true);
    for (const r of results) if (r.status === 'rejected') showError(r.reason);
    if (saved) {
      const kept = [...touched].map((t) => [t, t.type === 'checkbox' || t.type === 'radio' ? t.checked : t.value]);
      applyValues(saved, { restoring: true }); // again now that the selects have options
      for (const [t, v] of kept) { if (typeof v === 'boolean') t.checked = v; else t.value = v; }
      if (kept.length) { syncPreset(); saveForm(); }
    }
    syncPreset();
    DR.startJobs(); // event stream, status refresh, resume this tab's last job (jobs.js)
  }

  Object.assign(DR, {
    $, el, api, ApiError, parseJSON, setOnline, toast, showError, clearToast, copyText, showPage, fillForm,
    readForm, saveForm, saveSoon, showNotes, pixelFit, openLightbox, closeLightbox, setModels, selectModel, state,
    fillSelect, currentModelEntry, updateSizePlaceholders, syncPreset, intOr, floatOr, optInt,
  });
  document.addEventListener('DOMContentLoaded', () => { init().catch(showError); });
})();
