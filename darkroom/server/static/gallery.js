/* Darkroom browser UI — History, PNG info and Models pages.
 * Loaded (defer) after app.js and jobs.js; uses app.js's helpers via window.Darkroom.
 * Runs before DOMContentLoaded, so its page hooks are in place for app.js's init.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, toast, showError, copyText, fillForm, openLightbox, pixelFit } = DR;

  // ================================================================== History

  const H = { page: 1, perPage: 24, q: '', pages: 1, items: [], current: null, seq: 0, returnFocus: null,
    favourites: false, selecting: false, selected: new Set() };

  /** Save an image under a readable name: fetched as a blob (works for private, unsaved results too),
   *  the extension from its type; the server's message if it cannot be fetched. */
  async function downloadImage(url, base) {
    let res;
    try { res = await fetch(url, { credentials: 'same-origin' }); } catch (e) { showError(new Error('server unreachable')); return; }
    if (!res.ok) {
      let msg = `HTTP ${res.status}`;
      try { const d = await res.json(); msg = d.error || d.detail || msg; } catch (e) { /* not JSON */ }
      showError(new Error(msg));
      return;
    }
    const blob = await res.blob();
    const ext = { 'image/jpeg': '.jpg', 'image/webp': '.webp' }[blob.type] || '.png';
    const href = URL.createObjectURL(blob);
    const a = el('a', { href, download: base + ext, className: 'offscreen' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60000);
  }
  DR.downloadImage = downloadImage;

  function fmtDate(unix) {
    if (!unix) return '';
    try { return new Date(unix * 1000).toLocaleString(); } catch (e) { return ''; }
  }

  async function loadHistory() {
    const seq = ++H.seq; // ignore answers to superseded requests (fast typing, paging)
    const grid = $('history-grid');
    grid.setAttribute('aria-busy', 'true');
    const params = new URLSearchParams({ page: String(H.page), per_page: String(H.perPage) });
    if (H.q) params.set('q', H.q);
    if (H.favourites) params.set('favourites', 'true');
    try {
      const data = await api('/api/history?' + params.toString());
      if (seq !== H.seq) return;
      const total = data.total || 0;
      H.pages = Math.max(1, Math.ceil(total / (data.per_page || H.perPage)));
      if (H.page > H.pages) { H.page = H.pages; return loadHistory(); } // e.g. after deleting the last item
      H.items = data.items || [];
      renderHistory(total);
    } catch (e) {
      if (seq !== H.seq) return;
      showError(e);
      grid.replaceChildren(el('p', { className: 'empty error-text' }, 'Could not load history: ' + e.message));
    } finally {
      if (seq === H.seq) grid.removeAttribute('aria-busy');
    }
  }

  function renderHistory(total) {
    const grid = $('history-grid');
    $('history-page').textContent = `page ${H.page} of ${H.pages}`;
    $('history-prev').disabled = H.page <= 1;
    $('history-next').disabled = H.page >= H.pages;
    grid.dataset.total = String(total);
    if (!H.items.length) {
      grid.replaceChildren(el('p', { className: 'empty muted' },
        H.q ? `No images match “${H.q}”${H.favourites ? ' among the favourites' : ''}.`
          : H.favourites ? 'No favourites yet: star an image (☆) to keep it here.'
            : 'No images yet. Finished generations appear here (private ones never do).'));
      renderSelection();
      return;
    }
    grid.replaceChildren(...H.items.map((item) => {
      const img = el('img', { // the small cached thumbnail; the full image only in the detail view
        className: 'history-item', src: item.thumb_url || item.url, loading: 'lazy', decoding: 'async',
        alt: item.prompt || 'Generated image', title: item.prompt || '',
      });
      if (item.width && item.height) { img.width = item.width; img.height = item.height; } // reserves space
      const cell = el('button', { type: 'button', className: 'history-cell', 'aria-label': 'Open: ' + (item.prompt || 'image') }, img);
      cell.dataset.id = String(item.id);
      cell.addEventListener('click', () => {
        if (!H.selecting) { openDetail(item); return; }
        if (H.selected.has(item.id)) H.selected.delete(item.id); else H.selected.add(item.id);
        renderSelection();
      });
      const star = el('button', { type: 'button', className: 'star' + (item.favourite ? ' on' : ''),
        textContent: item.favourite ? '★' : '☆', 'aria-pressed': String(!!item.favourite),
        'aria-label': (item.favourite ? 'Unstar: ' : 'Star: ') + (item.prompt || 'image') });
      star.addEventListener('click', () => toggleFavourite(item, star));
      return el('div', { className: 'history-tile' }, cell, star);
    }));
    renderSelection();
  }

  async function toggleFavourite(item, star) {
    star.disabled = true;
    try {
      const now = await api(`/api/history/${encodeURIComponent(item.id)}/favourite`, { method: 'PUT', json: { favourite: !item.favourite } });
      item.favourite = !!now.favourite;
      star.classList.toggle('on', item.favourite);
      star.textContent = item.favourite ? '★' : '☆';
      star.setAttribute('aria-pressed', String(item.favourite));
      star.setAttribute('aria-label', (item.favourite ? 'Unstar: ' : 'Star: ') + (item.prompt || 'image'));
      if (H.favourites && !item.favourite) loadHistory();
    } catch (e) {
      showError(e);
    } finally {
      star.disabled = false;
    }
  }

  /** Select mode: cells toggle instead of opening; the bar counts and deletes the chosen images. */
  function renderSelection() {
    $('history-select').setAttribute('aria-pressed', String(H.selecting));
    $('history-select').textContent = H.selecting ? 'Done selecting' : 'Select';
    $('history-grid').classList.toggle('selecting', H.selecting);
    for (const cell of $('history-grid').querySelectorAll('.history-cell')) {
      const on = H.selected.has(Number(cell.dataset.id));
      cell.classList.toggle('selected', on);
      if (H.selecting) cell.setAttribute('aria-pressed', String(on)); else cell.removeAttribute('aria-pressed');
    }
    $('history-bulk').hidden = !H.selecting;
    $('history-bulk-count').textContent = `${H.selected.size} selected`;
    $('history-bulk-delete').disabled = !H.selected.size;
  }

  async function deleteSelected() {
    const ids = [...H.selected];
    if (!ids.length) return;
    if (!window.confirm(`Delete ${ids.length} image${ids.length === 1 ? '' : 's'} from history? The files are removed from disk.`)) return;
    const btn = $('history-bulk-delete');
    btn.disabled = true;
    try {
      const r = await api('/api/history/delete', { method: 'POST', json: { ids } });
      H.selected.clear();
      toast(`Deleted ${r.deleted.length} image${r.deleted.length === 1 ? '' : 's'}` + (r.missing.length ? ` (${r.missing.length} already gone)` : ''));
      await loadHistory();
    } catch (e) {
      showError(e);
      renderSelection();
    }
  }

  function openDetail(item) {
    H.current = item;
    H.returnFocus = document.activeElement;
    $('history-detail-img').src = item.url;
    $('history-detail-img').alt = item.prompt || 'Generated image';
    $('history-detail-title').textContent = item.prompt ? item.prompt.slice(0, 80) + (item.prompt.length > 80 ? '…' : '') : 'Image';
    const meta = [fmtDate(item.created), item.model,
      item.width && item.height ? `${item.width}×${item.height}` : null,
      item.seed !== undefined && item.seed !== null ? `seed ${item.seed}` : null].filter(Boolean);
    $('history-detail-meta').textContent = meta.join(' · ');
    $('history-detail-info').textContent = item.infotext || '';
    $('history-open').href = item.url;
    $('history-detail').hidden = false;
    pixelFit($('history-detail-img'), { maxScale: 4, maxVh: 0.7 }); // small images: crisp 2x–4x
    document.body.classList.add('modal-open');
    $('history-close').focus();
  }

  /** Close the detail dialog; returns true if it was open (Esc handling in app.js). */
  function closeDetail() {
    const d = $('history-detail');
    if (d.hidden) return false;
    d.hidden = true;
    document.body.classList.remove('modal-open');
    $('history-detail-img').removeAttribute('src');
    if (H.returnFocus && H.returnFocus.isConnected) H.returnFocus.focus();
    H.current = null;
    return true;
  }
  DR.closeDetail = closeDetail;
  DR.currentHistoryUrl = () => (H.current ? H.current.url : null); // img2img.js's "Send to img2img"

  /** Request dict for an item: the stored one, else rebuilt from the item's own fields. */
  function itemRequest(item) {
    if (item.request && typeof item.request === 'object') return item.request;
    const keys = ['prompt', 'negative_prompt', 'seed', 'width', 'height', 'model', 'sampler', 'steps', 'cfg_scale'];
    const req = {};
    for (const k of keys) if (item[k] !== undefined) req[k] = item[k];
    return req;
  }

  async function deleteCurrent() {
    const item = H.current;
    if (!item) return;
    if (!window.confirm('Delete this image from history? The file is removed from disk.')) return;
    const btn = $('history-delete');
    btn.disabled = true;
    try {
      await api(`/api/history/${encodeURIComponent(item.id)}`, { method: 'DELETE' });
      closeDetail();
      toast('Deleted');
      await loadHistory();
    } catch (e) {
      showError(e);
    } finally {
      btn.disabled = false;
    }
  }

  let searchTimer = null;
  $('history-search').addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      H.q = $('history-search').value.trim();
      H.page = 1;
      loadHistory();
    }, 300);
  });
  $('history-favourites').addEventListener('click', () => {
    H.favourites = !H.favourites;
    $('history-favourites').setAttribute('aria-pressed', String(H.favourites));
    H.page = 1;
    loadHistory();
  });
  $('history-select').addEventListener('click', () => {
    H.selecting = !H.selecting;
    if (!H.selecting) H.selected.clear();
    renderSelection();
  });
  $('history-bulk-all').addEventListener('click', () => { for (const it of H.items) H.selected.add(it.id); renderSelection(); });
  $('history-bulk-delete').addEventListener('click', deleteSelected);
  $('history-prev').addEventListener('click', () => { if (H.page > 1) { H.page--; loadHistory(); } });
  $('history-next').addEventListener('click', () => { if (H.page < H.pages) { H.page++; loadHistory(); } });
  $('history-close').addEventListener('click', closeDetail);
  $('history-detail').addEventListener('click', (e) => { if (e.target === $('history-detail')) closeDetail(); });
  // the lightbox (viewer.js) over this page of History: previous/next, zoom, actions; "Open full size" too
  const viewPage = (e) => {
    if (!H.current) return;
    if (e) e.preventDefault();
    openLightbox(H.items.map(DR.historyViewItem), Math.max(0, H.items.indexOf(H.current)));
  };
  $('history-detail-img').addEventListener('click', () => viewPage());
  $('history-detail-img').addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); viewPage(); } });
  $('history-open').addEventListener('click', viewPage);
  $('history-use').addEventListener('click', () => {
    if (!H.current) return;
    const req = itemRequest(H.current);
    const { source_url: source, mask_url: mask, infotext, url } = H.current;
    closeDetail();
    fillForm({ ...req, infotext, result_url: url }); // the infotext's ControlNet lines, the maps in the PNG (controlnet.js)
    if (source && DR.restoreInitFrom) DR.restoreInitFrom(source, mask); // an img2img item: its source and mask too
  });
  $('history-copy').addEventListener('click', () => { if (H.current) copyText(H.current.infotext || ''); });
  $('history-delete').addEventListener('click', deleteCurrent);

  DR.pageHooks.history = loadHistory; // fresh every time the page is shown

  // A finished job refreshes the grid if it is on screen (the page hook covers the rest).
  DR.onJobFinished = (job) => {
    if (job.state === 'error' || job.private || (job.request && job.request.private)) return;
    if (DR.currentPage === 'history' && $('history-detail').hidden) loadHistory();
  };

  // ================================================================== PNG info

  const P = { request: null, thumbUrl: null };

  function renderPngResult(data) {
    const box = $('png-result');
    P.request = data && data.request && typeof data.request === 'object' ? data.request : null;
    if (P.request && data.parameters) P.request = { ...P.request, infotext: data.parameters }; // ControlNet lines
    $('png-send').disabled = !P.request;
    const format = data && data.format && data.format !== 'none' ? data.format : null;
    const params = data && data.parameters;
    if (!params && !P.request) {
      box.replaceChildren(el('p', { className: 'png-none' }, 'no generation parameters in this image'));
      return;
    }
    box.replaceChildren(
      el('p', { className: 'png-format' }, 'Source: ', el('strong', { textContent: format || 'unknown' })),
      el('pre', { className: 'infotext', id: 'png-params', textContent: params || JSON.stringify(P.request, null, 2) }),
    );
  }

  async function inspectFile(file) {
    if (!file) return;
    if (P.thumbUrl) URL.revokeObjectURL(P.thumbUrl);
    P.thumbUrl = URL.createObjectURL(file);
    $('png-thumb').src = P.thumbUrl;
    $('png-thumb').hidden = false;
    $('png-result').replaceChildren(el('p', { className: 'muted' }, `Reading ${file.name || 'image'}…`));
    $('png-send').disabled = true;
    const form = new FormData();
    form.append('file', file, file.name || 'image.png');
    try {
      renderPngResult(await api('/api/png-info', { method: 'POST', form }));
    } catch (e) {
      showError(e);
      $('png-result').replaceChildren(el('p', { className: 'error-text' }, e.message));
    }
  }

  const drop = $('png-drop');
  const { hasFiles } = DR;
  DR.fileDropZone(drop, inspectFile);
  // A file dropped anywhere else must not navigate away from the app; on the
  // PNG info page it is inspected as if dropped on the zone.
  window.addEventListener('dragover', (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener('drop', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    if (DR.currentPage === 'pnginfo') inspectFile(e.dataTransfer.files[0]);
  });
  // Paste an image (e.g. copied from another tab) while on the PNG info page.
  document.addEventListener('paste', (e) => {
    if (DR.currentPage !== 'pnginfo' || !e.clipboardData) return;
    const f = [...e.clipboardData.files].find((x) => /^image\//.test(x.type));
    if (f) { e.preventDefault(); inspectFile(f); }
  });
  $('png-file').addEventListener('change', () => {
    const f = $('png-file').files[0];
    $('png-file').value = ''; // choosing the same file again fires 'change' again
    inspectFile(f);
  });
  $('png-send').addEventListener('click', () => { if (P.request) fillForm(P.request); });

  // ================================================================== Models

  function renderModelsTable(all) {
    const tbody = $('models-table').tBodies[0];
    const q = ($('models-search').value || '').trim().toLowerCase();
    const list = q ? all.filter((m) => `${m.name} ${m.family || ''} ${m.hash || ''}`.toLowerCase().includes(q)) : all;
    if (all.length && !list.length) {
      tbody.replaceChildren(el('tr', {}, el('td', { colSpan: 5, className: 'empty muted' }, `No model matches "${q}".`)));
      return;
    }
    if (!list.length) {
      tbody.replaceChildren(el('tr', {}, el('td', { colSpan: 5, className: 'empty muted' },
        'No checkpoints found. Add .safetensors files to the models folder and press Rescan.')));
      return;
    }
    tbody.replaceChildren(...list.map((m) => {
      // The current model gets a plain label, not a (low-contrast) disabled button.
      // A broken file gets its error on the row and no Use button; the current one a plain label.
      const use = m.error ? el('span', { className: 'model-broken', textContent: 'Cannot be used' })
        : m.current ? el('span', { className: 'in-use', textContent: 'In use' })
          : el('button', { type: 'button', className: 'btn btn-small', textContent: 'Use' });
      use.dataset.model = m.name;
      if (!m.current && !m.error) {
        use.addEventListener('click', async () => {
          for (const b of tbody.querySelectorAll('button')) b.disabled = true;
          use.textContent = 'Loading…';
          await DR.selectModel(m.name); // re-renders this table via DR.onModels
        });
      }
      const row = el('tr', { className: m.error ? 'broken' : m.current ? 'current' : '' },
        el('td', { className: 'model-name', 'data-label': 'Name' },
          m.preview_url ? el('img', { className: 'model-preview', src: m.preview_url, alt: '', loading: 'lazy' }) : null,
          m.name, m.current ? el('span', { className: 'badge', textContent: 'current' }) : null,
          m.builtin ? el('span', { className: 'badge badge-muted', textContent: 'built-in demo · 128 px shapes' }) : null,
          m.path ? el('span', { className: 'model-path', textContent: m.path, title: m.path }) : null,
          DR.modelCard ? DR.modelCard(m) : null,
          m.error ? el('span', { className: 'model-error', role: 'note', textContent: m.error }) : null),
        el('td', { 'data-label': 'Family' }, m.family || '—'),
        el('td', { 'data-label': 'Size' }, m.size || '—'),
        el('td', { className: 'mono', 'data-label': 'Hash', title: m.hash || '' }, m.hash ? m.hash.slice(0, 10) : '—'),
        el('td', { className: 'cell-action' }, use));
      if (m.current) row.setAttribute('aria-current', 'true');
      return row;
    }));
  }
  DR.onModels.push(renderModelsTable);
  $('models-search').addEventListener('input', () => renderModelsTable(DR.state.models || []));
  $('models-table').tBodies[0].replaceChildren(el('tr', {}, el('td', { colSpan: 5, className: 'empty muted' }, 'Loading…')));

  $('models-rescan').addEventListener('click', async () => {
    const btn = $('models-rescan');
    btn.disabled = true;
    btn.textContent = 'Scanning…';
    try {
      DR.setModels(await api('/api/models/rescan', { method: 'POST' }));
      toast(`${DR.state.models.length} model${DR.state.models.length === 1 ? '' : 's'} found`);
    } catch (e) {
      showError(e);
    } finally {
      btn.disabled = false;
      btn.textContent = 'Rescan';
    }
  });
  // Refresh the list (and current model) whenever the page is opened.
  DR.pageHooks.models = async () => { DR.setModels(await api('/api/models')); };
})();
