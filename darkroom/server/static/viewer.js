/* Darkroom browser UI — one result viewer and the lightbox.
 *
 * The viewer (#results): the live preview sits where the result will be, at the size the result is
 * drawn; the finished images replace it at that same size. An image is drawn at its natural size up
 * to the viewer's width (a hires result bigger than its base, an X/Y grid bigger than its cells);
 * small images (the starter model's 128 px) at a whole-number scale up to 4x, with crisp pixels.
 * A job's infotext and actions are shown once, for the selected image; a strip below keeps this
 * session's results (while the page lives).
 *
 * The lightbox (#lightbox, shared with History and Extras): previous/next (arrows, keys), a counter,
 * the caption (prompt, seed), zoom (fit / 100%, + and -, the mouse wheel) and actions.
 * Loaded (defer) right after app.js, so that jobs.js, gallery.js and upscale.js pick up its
 * openLightbox; its listeners are registered before app.js's, which they take over.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, toast, showError, copyText, intOr, floatOr } = DR;
  const IMAGE_TYPE = 'application/x-darkroom-image'; // a dragged result: its URL (img2img.js takes it)

  // ================================================================== sizes

  /** The displayed size of an image of natural size nw x nh in a box boxW wide. */
  function fitSize(nw, nh, boxW) {
    const maxH = Math.max(200, window.innerHeight * 0.75);
    if (nw < 256 && nh < 256) {
      const s = Math.max(1, Math.min(4, Math.floor(boxW / nw), Math.floor(maxH / nh)));
      return [nw * s, nh * s, s];
    }
    const s = Math.min(1, boxW / nw);
    return [Math.max(1, Math.round(nw * s)), Math.max(1, Math.round(nh * s)), s];
  }

  /** The width of one image's cell in a stage showing n images (two columns when there is room). */
  function cellWidth(stage, n) {
    const W = stage.clientWidth || ($('results').clientWidth - 24) || 320;
    const cols = n > 1 && W >= 520 ? 2 : 1;
    stage.classList.toggle('cols-2', cols === 2);
    return Math.floor((W - (cols - 1) * 8) / cols);
  }

  function sizeImage(img) {
    const nw = +img.dataset.nw, nh = +img.dataset.nh;
    if (!nw || !nh) return;
    const stage = img.closest('.result-stage');
    const n = stage ? +(stage.dataset.cells || 1) : 1;
    const [w, h, s] = fitSize(nw, nh, stage ? cellWidth(stage, n) : 320);
    if (img.width !== w) img.width = w;
    if (img.height !== h) img.height = h;
    img.classList.toggle('pixel-fit', s >= 2);
  }

  /** Size `img` as an nw x nh image now, and by its natural size once loaded (`natural`). */
  function sized(img, nw, nh, natural = true) {
    img.dataset.nw = String(nw);
    img.dataset.nh = String(nh);
    if (natural) {
      img.addEventListener('load', () => {
        if (!img.naturalWidth) return;
        img.dataset.nw = String(img.naturalWidth);
        img.dataset.nh = String(img.naturalHeight);
        sizeImage(img);
      });
    }
    requestAnimationFrame(() => sizeImage(img));
    return img;
  }

  /** The size a job's result will have: the request's, the source image's or the model's, then the hires fix's. */
  function targetSize(job) {
    const r = (job && job.request) || {};
    const src = DR.sizeSource ? DR.sizeSource() : null;
    const m = DR.currentModelEntry ? DR.currentModelEntry() : null;
    const native = (m && m.native_size) || 512;
    let w = r.width || (src && src.w) || native, h = r.height || (src && src.h) || native;
    if (r.enable_hr && !r.init_image) {
      const x = r.hr_resize_x || 0, y = r.hr_resize_y || 0;
      if (x && y) { w = x; h = y; } else if (x) { h = Math.round((h * x) / w); w = x; } else if (y) { w = Math.round((w * y) / h); h = y; } else {
        w = Math.round(w * (r.hr_scale || 2)); h = Math.round(h * (r.hr_scale || 2));
      }
    }
    return [w, h];
  }

  // ================================================================== the viewer

  const V = { session: [], shown: null }; // session: [{job, init}], newest first

  function draggable(img, url) {
    img.draggable = true;
    img.addEventListener('dragstart', (e) => {
      e.dataTransfer.setData(IMAGE_TYPE, url);
      e.dataTransfer.setData('text/uri-list', new URL(url, location.href).href);
      e.dataTransfer.effectAllowed = 'copy';
    });
    return img;
  }

  /** Put the live preview (#preview) where the job's result will appear, at the result's size. */
  function live(job) {
    const box = $('results');
    const preview = $('preview');
    let fig = box.querySelector('.result-live');
    if (!fig) {
      for (const old of box.children) old.classList.add('superseded');
      fig = el('figure', { className: 'result result-live' }, el('div', { className: 'result-stage' }));
      box.prepend(fig);
    }
    const stage = fig.firstElementChild;
    const n = job.plan ? 1 : Math.max(1, (job.request && job.request.batch_size) || 1);
    stage.dataset.cells = String(Math.min(n, job.images_total || n));
    if (preview.parentElement !== stage) stage.append(preview);
    preview.classList.add('result-image-live');
    const [w, h] = targetSize(job);
    if (+preview.dataset.nw !== w || +preview.dataset.nh !== h) sized(preview, w, h, false);
    else sizeImage(preview);
  }

  /** The job ended: the preview goes back to the progress panel (hidden) and older results show again. */
  function endLive() {
    const preview = $('preview');
    preview.hidden = true;
    preview.classList.remove('result-image-live');
    if (preview.parentElement !== $('progress')) $('progress').append(preview);
    const box = $('results');
    const fig = box.querySelector('.result-live');
    if (fig) fig.remove();
    for (const old of box.querySelectorAll('.superseded')) old.classList.remove('superseded');
  }

  /** Items for the lightbox from a finished job: the X/Y grid first, then every image. */
  function jobItems(job, init) {
    const req = job.request || {};
    const items = job.grid_url ? [{ url: job.grid_url, caption: 'X/Y grid', prompt: req.prompt, grid: true }] : [];
    for (const im of job.images || []) {
      items.push({ url: im.url, prompt: req.prompt, seed: im.seed, infotext: im.infotext, historyId: im.history_id,
        request: { ...req, seed: im.seed }, init });
    }
    return items;
  }

  /** Show a finished job in the viewer; `remember` adds it to this session's strip. */
  function show(job, { init = null, remember = true } = {}) {
    endLive();
    const box = $('results');
    const imgs = job.images || [];
    if (!imgs.length) {
      if (job.state === 'interrupted' && box.querySelector('.result')) {
        const old = box.querySelector('.results-note');
        if (old) old.remove();
        box.prepend(el('p', { className: 'results-note muted' },
          'Interrupted before any image finished. The images below are from an earlier job.'));
      } else {
        box.replaceChildren(el('p', { className: 'empty muted' },
          job.state === 'interrupted' ? 'Interrupted before any image finished.' : 'No images.'));
      }
      return;
    }
    if (remember) {
      V.session = [{ job, init }, ...V.session.filter((s) => s.job.id !== job.id)].slice(0, 200);
    }
    V.shown = job.id;
    const items = jobItems(job, init);
    const off = job.grid_url ? 1 : 0;
    const viewable = (img, i) => {
      img.tabIndex = 0;
      img.addEventListener('click', () => open(items, i));
      img.addEventListener('keydown', (e) => { if (e.key === 'Enter') open(items, i); });
      return draggable(img, items[i].url);
    };
    const [tw, th] = targetSize(job);
    const figs = [];
    if (job.grid_url) {
      const stage = el('div', { className: 'result-stage' },
        sized(viewable(el('img', { className: 'grid-image', src: job.grid_url, alt: 'X/Y grid' }), 0), tw, th));
      figs.push(el('figure', { className: 'result result-grid' }, stage,
        el('figcaption', {}, el('span', { className: 'muted grid-caption',
          textContent: `X/Y grid · ${imgs.length} cell image${imgs.length === 1 ? '' : 's'} below` }))));
    }
    const stage = el('div', { className: 'result-stage' });
    stage.dataset.cells = String(imgs.length);
    stage.append(...imgs.map((im, i) => sized(viewable(el('img', {
      className: 'result-image', src: im.url, alt: `Result ${i + 1} (seed ${im.seed})` }), i + off), tw, th)));
    const info = el('pre', { className: 'infotext' });
    const seeds = el('div', { className: 'result-seeds', role: 'group', 'aria-label': 'Images of this job' });
    let sel = 0;
    const select = (i) => {
      sel = i;
      info.textContent = imgs[i].infotext || '';
      for (const [k, b] of [...seeds.children].entries()) b.setAttribute('aria-pressed', String(k === i));
      for (const [k, im] of [...stage.children].entries()) im.classList.toggle('selected', k === i && imgs.length > 1);
    };
    if (imgs.length > 1) {
      seeds.append(...imgs.map((im, i) => {
        const b = el('button', { type: 'button', className: 'btn btn-small result-seed', textContent: `seed ${im.seed}` });
        b.addEventListener('click', () => select(i));
        return b;
      }));
    }
    const button = (text, cls, fn) => {
      const b = el('button', { type: 'button', className: `btn ${cls}`, textContent: text });
      b.addEventListener('click', () => fn(items[sel + off]));
      return b;
    };
    const priv = job.private || (job.request && job.request.private); // the server sends job.private
    figs.push(el('figure', { className: 'result result-set' }, stage, el('figcaption', {},
      imgs.length > 1 ? seeds : null,
      priv ? el('p', { className: 'badge', textContent: 'Private · not saved' }) : null,
      info,
      el('div', { className: 'actions' },
        button('Copy parameters', 'copy-params', (it) => copyText(it.infotext || '')),
        button('Use these settings', 'use-settings', useSettings),
        button('Send to img2img', 'send-img2img', (it) => DR.sendToImg2img(it.url)),
        button('Send to inpaint', 'send-inpaint', (it) => DR.sendToImg2img(it.url, { inpaint: true })),
        button('Send to extras', 'send-extras', (it) => DR.sendToExtras(it.url, `seed-${it.seed}`)),
        button('Use as control image', 'use-control', (it) => DR.useAsControl(it.url)), // controlnet.js
        button('Download', 'download-image', (it) => DR.downloadImage(it.url, `darkroom-${it.seed}`))))));
    select(0);
    box.replaceChildren(...figs);
    renderStrip();
  }

  /** "Use these settings": everything the request holds, and an img2img job's source (and mask): this
   *  page's copy, else the one History stored with the image. */
  function useSettings(it, opts = { switchPage: false }) {
    if (!it || !it.request) { toast('No generation settings to use', 'error'); return; }
    DR.fillForm({ ...it.request, infotext: it.infotext, result_url: it.url }, opts); // ControlNet lines and maps
    if (it.init && it.init.image && DR.restoreInit) DR.restoreInit(it.init);
    else if (it.sourceUrl && DR.restoreInitFrom) DR.restoreInitFrom(it.sourceUrl, it.maskUrl);
  }

  function renderStrip() {
    let strip = $('result-strip');
    if (!strip) {
      strip = el('section', { className: 'result-strip', id: 'result-strip', 'aria-label': 'Results of this session' },
        el('h3', { className: 'sub-title', textContent: 'This session' }), el('div', { className: 'strip-items' }));
      $('results').after(strip);
    }
    strip.hidden = V.session.length < 2;
    strip.lastElementChild.replaceChildren(...V.session.map((s) => {
      const first = s.job.grid_url || ((s.job.images || [])[0] || {}).url;
      const n = (s.job.images || []).length;
      const img = draggable(el('img', { className: 'strip-thumb', src: first, alt: (s.job.request || {}).prompt || 'Result', loading: 'lazy' }), first);
      const b = el('button', { type: 'button', className: 'strip-item' + (s.job.id === V.shown ? ' active' : ''),
        title: (s.job.request || {}).prompt || '' }, img, n > 1 ? el('span', { className: 'strip-count', textContent: `×${n}` }) : null);
      b.addEventListener('click', () => show(s.job, { init: s.init, remember: false }));
      return b;
    }));
  }

  if (window.ResizeObserver) {
    new ResizeObserver(() => requestAnimationFrame(() => {
      for (const img of $('results').querySelectorAll('img[data-nw]')) sizeImage(img);
    })).observe($('results'));
  }

  // ================================================================== lightbox

  const L = { items: [], i: 0, zoom: 0, returnFocus: null }; // zoom 0 = fit
  const lb = $('lightbox');
  const lbImg = $('lightbox-img');
  const ctl = (text, cls, label, fn) => {
    const b = el('button', { type: 'button', className: `btn ${cls}`, textContent: text, 'aria-label': label || text, title: label || text });
    b.addEventListener('click', fn);
    return b;
  };
  const counter = el('span', { className: 'lightbox-counter', 'aria-live': 'polite' });
  const caption = el('p', { className: 'lightbox-caption' });
  const zoomLabel = el('span', { className: 'lightbox-zoom muted' });
  const download = el('a', { className: 'btn lightbox-download', textContent: 'Download', download: '' });
  const del = ctl('Delete', 'btn-danger lightbox-delete', 'Delete from history', () => deleteItem());
  const actions = el('div', { className: 'lightbox-actions' },
    ctl('Fit', 'lightbox-fit', 'Fit to the window', () => setZoom(0)),
    ctl('100%', 'lightbox-actual', 'Actual size (100%)', () => setZoom(1)),
    ctl('−', 'btn-icon lightbox-out', 'Zoom out', () => zoomBy(1 / 1.25)),
    ctl('+', 'btn-icon lightbox-in', 'Zoom in', () => zoomBy(1.25)), zoomLabel,
    download,
    ctl('Send to img2img', 'lightbox-img2img', null, () => { const it = cur(); close(); DR.sendToImg2img(it.url); }),
    ctl('Send to inpaint', 'lightbox-inpaint', null, () => { const it = cur(); close(); DR.sendToImg2img(it.url, { inpaint: true }); }),
    ctl('Use as control image', 'lightbox-control', null, () => { const it = cur(); close(); if (DR.closeDetail) DR.closeDetail(); DR.useAsControl(it.url); }),
    ctl('Use settings', 'lightbox-use', 'Use these settings', () => { const it = cur(); close(); if (DR.closeDetail) DR.closeDetail(); useSettings(it, { switchPage: true }); }),
    del);
  const stage = el('div', { className: 'lightbox-stage' });
  lbImg.replaceWith(stage);
  stage.append(lbImg);
  const prev = ctl('‹', 'btn-icon lightbox-prev', 'Previous image', () => step(-1));
  const next = ctl('›', 'btn-icon lightbox-next', 'Next image', () => step(1));
  lb.append(el('div', { className: 'lightbox-bar' }, counter, caption), prev, next, el('div', { className: 'lightbox-tools' }, actions));

  const cur = () => L.items[L.i] || {};

  /** Open the lightbox on `items` (URLs, or {url, prompt, seed, infotext, request, historyId, init}) at `i`. */
  function open(items, i = 0) {
    const list = (Array.isArray(items) ? items : [items]).map((x) => (typeof x === 'string' ? { url: x } : x));
    if (!list.length) return;
    L.items = list;
    L.i = Math.max(0, Math.min(list.length - 1, i));
    if (lb.hidden) L.returnFocus = document.activeElement;
    lb.hidden = false;
    document.body.classList.add('lightbox-open');
    showCurrent();
    $('lightbox-close').focus();
  }
  function close() {
    if (lb.hidden) return false;
    lb.hidden = true;
    document.body.classList.remove('lightbox-open');
    lbImg.removeAttribute('src');
    if (L.returnFocus && L.returnFocus.isConnected && L.returnFocus.focus) L.returnFocus.focus();
    return true;
  }
  function step(d) {
    if (L.items.length < 2) return;
    L.i = (L.i + d + L.items.length) % L.items.length;
    showCurrent();
  }
  function showCurrent() {
    const it = cur();
    L.zoom = 0;
    lbImg.src = it.url;
    lbImg.alt = it.prompt || it.caption || 'Full size image';
    counter.textContent = `${L.i + 1} / ${L.items.length}`;
    const bits = [it.caption, it.prompt, it.seed !== undefined && it.seed !== null ? `seed ${it.seed}` : null].filter(Boolean);
    caption.textContent = bits.join(' · ');
    download.href = it.url;
    download.download = `darkroom-${it.seed !== undefined && it.seed !== null ? it.seed : L.i + 1}.png`;
    prev.hidden = next.hidden = L.items.length < 2;
    del.hidden = !it.historyId;
    for (const c of actions.querySelectorAll('.lightbox-use')) c.hidden = !it.request;
    applyZoom();
  }
  function setZoom(z) { L.zoom = z; applyZoom(); }
  function zoomBy(f) {
    const base = L.zoom || (lbImg.naturalWidth ? lbImg.getBoundingClientRect().width / lbImg.naturalWidth : 1);
    setZoom(Math.min(16, Math.max(0.05, base * f)));
  }
  function applyZoom() {
    const fit = !L.zoom;
    stage.classList.toggle('zoomed', !fit);
    lbImg.classList.toggle('pixel-fit', !fit && L.zoom >= 2);
    if (fit) {
      lbImg.style.width = lbImg.style.height = '';
      // fit, but a small image still fills the window (whole-number scale, crisp pixels)
      const nw = lbImg.naturalWidth, nh = lbImg.naturalHeight;
      const s = nw && nh ? Math.floor(Math.min(stage.clientWidth / nw, stage.clientHeight / nh)) : 1;
      if (s >= 2) { lbImg.style.width = `${nw * s}px`; lbImg.style.height = `${nh * s}px`; lbImg.classList.add('pixel-fit'); }
      zoomLabel.textContent = 'fit';
    } else {
      lbImg.style.width = `${Math.round(lbImg.naturalWidth * L.zoom)}px`;
      lbImg.style.height = `${Math.round(lbImg.naturalHeight * L.zoom)}px`;
      zoomLabel.textContent = `${Math.round(L.zoom * 100)}%`;
    }
  }
  lbImg.addEventListener('load', applyZoom);

  async function deleteItem() {
    const it = cur();
    if (!it.historyId || !window.confirm('Delete this image from history? The file is removed from disk.')) return;
    try {
      await api(`/api/history/${encodeURIComponent(it.historyId)}`, { method: 'DELETE' });
      toast('Deleted');
      L.items.splice(L.i, 1);
      if (!L.items.length) close(); else { L.i = Math.min(L.i, L.items.length - 1); showCurrent(); }
      if (DR.closeDetail) DR.closeDetail();
      if (DR.currentPage === 'history' && DR.pageHooks.history) DR.pageHooks.history();
    } catch (e) {
      showError(e);
    }
  }

  // Registered before app.js's own lightbox listeners, which they replace (stopImmediatePropagation).
  lb.addEventListener('click', (e) => {
    e.stopImmediatePropagation();
    if (e.target === lb || e.target === stage || e.target.closest('#lightbox-close')) close();
  });
  stage.addEventListener('wheel', (e) => {
    if (lb.hidden) return;
    e.preventDefault();
    zoomBy(e.deltaY < 0 ? 1.25 : 1 / 1.25);
  }, { passive: false });
  lbImg.addEventListener('dblclick', () => setZoom(L.zoom ? 0 : 1));
  window.addEventListener('keydown', (e) => {
    if (lb.hidden) return;
    const keys = { Escape: close, ArrowRight: () => step(1), ArrowLeft: () => step(-1), '+': () => zoomBy(1.25),
      '=': () => zoomBy(1.25), '-': () => zoomBy(1 / 1.25), 0: () => setZoom(0), 1: () => setZoom(1) };
    const fn = keys[e.key];
    if (!fn) return;
    e.preventDefault();
    e.stopPropagation(); // app.js's lightbox keys and History's Escape
    fn();
  }, true);
  window.addEventListener('resize', () => { if (!lb.hidden) applyZoom(); });

  /** A History item as a lightbox item (gallery.js opens its page of items). */
  const historyViewItem = (item) => ({ url: item.url, prompt: item.prompt, seed: item.seed, infotext: item.infotext,
    historyId: item.id, request: item.request && typeof item.request === 'object' ? item.request : null,
    sourceUrl: item.source_url || null, maskUrl: item.mask_url || null }); // an img2img item's stored source and mask

  // ================================================================== settings the form has no other place for

  /* Clip skip, eta, ENSD and RNG ("More settings"): read into every request and restored by
   * "Use these settings" from whatever the infotext holds. */
  const MORE = [['clip_skip', 'clip-skip', 1], ['eta', 'eta', null], ['eta_noise_seed_delta', 'ensd', 0], ['randn_source', 'rng', 'CPU']];
  function updateMore() {
    const set = MORE.filter(([key, id, dflt]) => {
      const v = $(id).value.trim();
      return v !== '' && v !== String(dflt);
    }).map(([key, id]) => `${$(id).closest('.field').querySelector('.label').firstChild.textContent.trim()} ${$(id).value}`);
    $('advanced-info').textContent = set.join(', ');
    return set.length > 0;
  }
  DR.formExtensions.push({
    read(req) {
      req.clip_skip = Math.min(12, Math.max(1, intOr($('clip-skip').value, 1)));
      const eta = $('eta').value.trim();
      req.eta = eta === '' ? null : Math.min(1, Math.max(0, floatOr(eta, 0)));
      req.eta_noise_seed_delta = Math.max(0, intOr($('ensd').value, 0));
      req.randn_source = $('rng').value || 'CPU';
    },
    apply(req, notes) {
      const has = (k) => req[k] !== undefined;
      if (has('clip_skip') && req.clip_skip !== null) $('clip-skip').value = String(req.clip_skip);
      if (has('eta')) $('eta').value = req.eta === null ? '' : String(req.eta);
      if (has('eta_noise_seed_delta') && req.eta_noise_seed_delta !== null) $('ensd').value = String(req.eta_noise_seed_delta);
      if (has('randn_source') && req.randn_source) {
        const v = String(req.randn_source).toUpperCase();
        if ([...$('rng').options].some((o) => o.value === v)) $('rng').value = v; else notes.push(`RNG ${req.randn_source} not known`);
      }
      if (updateMore()) $('advanced-section').open = true; // restored values in view
    },
  });
  $('advanced-section').addEventListener('input', updateMore);

  Object.assign(DR, { openLightbox: open, closeLightbox: close, viewer: { open, close, live, endLive, show, fitSize },
    historyViewItem, IMAGE_TYPE });
})();
