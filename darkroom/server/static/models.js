/* Darkroom browser UI — adding models: where checkpoints live, importing files or a folder from a
 * path (the same verified copy as `darkroom models import`), using a webui's folder in place, files
 * in the wrong folder, and size presets that fit the selected model.
 * Loaded (defer) after app.js; welcome.js mounts the same "add models" form on the first-run panel.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, toast, showError, copyText } = DR;

  // ================================================================== size presets by model

  /* The sizes a family was trained around (native_size from /api/models): 128 for the starter,
   * 512 for SD 1.x, 768 for SD 2.x v, 1024 for SDXL. Unknown: every preset. */
  const PRESETS = {
    128: [['128x128', '128 × 128'], ['128x192', '128 × 192 (portrait)'], ['192x128', '192 × 128 (landscape)']],
    512: [['512x512', '512 × 512'], ['512x768', '512 × 768 (portrait)'], ['768x512', '768 × 512 (landscape)']],
    768: [['768x768', '768 × 768'], ['768x1024', '768 × 1024 (portrait)'], ['1024x768', '1024 × 768 (landscape)']],
    1024: [['1024x1024', '1024 × 1024'], ['832x1216', '832 × 1216 (portrait)'], ['1216x832', '1216 × 832 (landscape)'],
      ['896x1152', '896 × 1152 (portrait)'], ['1152x896', '1152 × 896 (landscape)']],
  };
  const ALL = [...PRESETS[512], ['768x768', '768 × 768'], ...PRESETS[1024].slice(0, 3), ['128x128', '128 × 128 (tiny)']];
  let fitted = null;

  /** Refill the size select's presets for the selected model (app.js calls this when the model changes). */
  DR.fitSizePresets = () => {
    const m = DR.currentModelEntry();
    const native = m && m.native_size ? Number(m.native_size) : 0;
    if (native === fitted) return;
    fitted = native;
    const sel = $('size-preset');
    const keep = sel.value;
    const first = sel.options[0], last = sel.options[sel.options.length - 1]; // "native" and "custom"
    const list = PRESETS[native] || ALL;
    sel.replaceChildren(first, ...list.map(([value, label]) => el('option', { value, textContent: label })), last);
    sel.value = keep;
    if (sel.value !== keep) sel.value = 'custom';
  };

  // ================================================================== model cards

  /** The model card of a /api/models row (NAME.json, NAME.civitai.info beside it) as a few lines
   * under its name; null when it has none. gallery.js puts it in the Models table's rows. */
  DR.modelCard = (m) => {
    const c = m && m.card;
    if (!c) return null;
    const line = (label, text) => (text ? el('span', { className: 'model-card-line' },
      el('span', { className: 'muted', textContent: label + ' ' }), el('span', { textContent: String(text) })) : null);
    const desc = c.description && c.description.length > 240 ? c.description.slice(0, 240) + '…' : c.description;
    const box = el('span', { className: 'model-card', title: (c.sources || []).join(', ') },
      c.title ? el('strong', { className: 'model-card-title', textContent: c.title }) : null,
      line('', desc), line('Activation text:', c.activation_text),
      line('Preferred weight:', c.preferred_weight), line('Base model:', c.base_model), line('Notes:', c.notes),
      ...(c.problems || []).map((p) => el('span', { className: 'model-card-line muted', role: 'note', textContent: p })));
    return box.childNodes.length ? box : null;
  };

  // ================================================================== library state

  const L = { state: null, listeners: [] };

  async function loadLibrary() {
    L.state = await api('/api/library');
    for (const cb of L.listeners) cb(L.state);
    return L.state;
  }
  DR.loadLibrary = loadLibrary;
  DR.onLibrary = (cb) => { L.listeners.push(cb); if (L.state) cb(L.state); };

  const pathLine = (label, path) => {
    const copy = el('button', { type: 'button', className: 'btn btn-small', textContent: 'Copy path' });
    copy.addEventListener('click', () => copyText(path));
    return el('p', { className: 'folder-line' }, el('span', { className: 'muted' }, label + ' '),
      el('code', { className: 'folder-path', textContent: path }), ' ', copy);
  };

  // ================================================================== the "add models" form

  const STATUS_TEXT = { imported: 'Imported', 'already there': 'Already there', refused: 'Refused', failed: 'Failed' };

  function outcomeItem(o) {
    const name = String(o.source || '').split(/[\\/]/).pop();
    const ok = o.status === 'imported' || o.status === 'already there';
    const detail = ok ? (o.kind ? `${o.kind} → ${o.dest}` : o.dest) + (o.note ? ` · ${o.note}` : '') : o.reason;
    return el('li', { className: 'import-outcome ' + (ok ? 'ok' : 'bad') },
      el('strong', { textContent: `${STATUS_TEXT[o.status] || o.status}: ` }), el('span', { textContent: name }),
      detail ? el('span', { className: 'muted import-detail', textContent: ' ' + detail }) : null);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const mib = (n) => (n / 1048576).toFixed(n < 10485760 ? 1 : 0) + ' MB';

  /** Follow a started import until it ends, showing its label and bytes; returns its final state. */
  async function followImport(status, bar) {
    for (;;) {
      const { importing } = await api('/api/library/import');
      if (!importing) return null;
      bar.hidden = !importing.running || !importing.total;
      bar.max = importing.total || 1;
      bar.value = importing.done || 0;
      if (importing.running) {
        status.textContent = `${importing.label}…` + (importing.total ? ` ${mib(importing.done)} of ${mib(importing.total)}` : '');
      } else return importing;
      await sleep(400);
    }
  }

  /** An import form and a use-in-place form in `box`; ids are prefixed with `prefix`. */
  function mountAddModels(box, prefix) {
    const id = (s) => `${prefix}-${s}`;
    const input = el('textarea', { id: id('import-path'), rows: 2, spellcheck: false, className: 'path-input',
      placeholder: '/media/usb/models  or  /home/me/Downloads/model.safetensors' });
    const go = el('button', { type: 'submit', className: 'btn btn-primary', id: id('import-go'), textContent: 'Import' });
    const status = el('p', { className: 'muted import-status', id: id('import-status'), 'aria-live': 'polite' });
    const bar = el('progress', { className: 'import-bar', max: 1, value: 0, hidden: true });
    const results = el('ul', { className: 'import-results', id: id('import-results') });
    const form = el('form', { className: 'add-form', id: id('import-form'), noValidate: true },
      el('label', { className: 'field field-wide', htmlFor: id('import-path') },
        el('span', { className: 'label' }, 'Import files or a folder (one path a line)')),
      input,
      el('p', { className: 'muted hint-text' }, 'Each file is copied into Darkroom\'s folder for its kind, checked by SHA-256; nothing is overwritten. Paths are on the machine running Darkroom.'),
      el('div', { className: 'actions' }, go), bar, status, results);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const paths = input.value.split('\n').map((s) => s.trim()).filter(Boolean);
      if (!paths.length) { status.textContent = 'Type the path of a model file or a folder first.'; input.focus(); return; }
      go.disabled = true;
      form.setAttribute('aria-busy', 'true');
      results.replaceChildren();
      status.textContent = 'Starting…';
      try {
        await api('/api/library/import', { method: 'POST', json: { paths } });
        const done = await followImport(status, bar);
        const outs = (done && done.outcomes) || [];
        results.replaceChildren(...outs.map(outcomeItem));
        const n = outs.filter((o) => o.status === 'imported').length;
        status.textContent = (done && done.error) ? `Stopped: ${done.error}`
          : `${n} file${n === 1 ? '' : 's'} imported` + (outs.length > n ? `, ${outs.length - n} not` : '') + '.';
        DR.setModels(await api('/api/models'));
        loadLibrary().catch(showError);
        if (n) toast(`Imported ${n} model file${n === 1 ? '' : 's'}`);
      } catch (err) {
        status.textContent = err.message;
        showError(err);
      } finally {
        go.disabled = false;
        bar.hidden = true;
        form.removeAttribute('aria-busy');
      }
    });

    const dirs = el('textarea', { id: id('dirs'), rows: 2, spellcheck: false, className: 'path-input',
      placeholder: '/home/me/stable-diffusion-webui  or  /home/me/ComfyUI' });
    const use = el('button', { type: 'submit', className: 'btn', id: id('dirs-go'), textContent: 'Use in place' });
    const dirsStatus = el('p', { className: 'muted', id: id('dirs-status'), 'aria-live': 'polite' });
    const dirsForm = el('form', { className: 'add-form', id: id('dirs-form'), noValidate: true },
      el('label', { className: 'field field-wide', htmlFor: id('dirs') },
        el('span', { className: 'label' }, 'Use an existing AUTOMATIC1111, Forge or ComfyUI folder in place')),
      dirs,
      el('p', { className: 'muted hint-text' }, 'Nothing is copied: its checkpoints, LoRAs, VAEs and embeddings are read where they are. Remembered across restarts (the models_dirs setting).'),
      el('div', { className: 'actions' }, use), dirsStatus);
    dirsForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      use.disabled = true;
      dirsStatus.textContent = 'Saving…';
      try {
        const folders = dirs.value.split('\n').map((s) => s.trim()).filter(Boolean);
        const state = await api('/api/library/folders', { method: 'PUT', json: { folders } });
        L.state = state;
        for (const cb of L.listeners) cb(state);
        DR.setModels(await api('/api/models'));
        dirsStatus.textContent = folders.length ? `Using ${folders.length} folder${folders.length === 1 ? '' : 's'} in place; ${DR.state.models.length} checkpoints listed.` : 'No folders used in place.';
      } catch (err) {
        dirsStatus.textContent = err.message;
        showError(err);
      } finally {
        use.disabled = false;
      }
    });
    DR.onLibrary((s) => { if (document.activeElement !== dirs) dirs.value = (s.models_dirs || []).join('\n'); });
    box.replaceChildren(form, dirsForm);
  }
  DR.mountAddModels = mountAddModels;

  // ================================================================== Models page: folders and misplaced files

  function renderLibrary(s) {
    const lines = [pathLine('Checkpoints folder:', s.checkpoints_folder)];
    for (const f of s.folders || []) if (f !== s.checkpoints_folder) lines.push(pathLine('Also read:', f));
    $('models-folders').replaceChildren(...lines);
    const mis = s.misplaced || [];
    $('models-misplaced').hidden = !mis.length;
    $('models-misplaced-list').replaceChildren(...mis.map((f) => el('li', { className: 'misplaced' },
      el('strong', { textContent: f.name }), el('span', { className: 'muted', textContent: ' ' + (f.reason || '') }))));
  }
  DR.onLibrary(renderLibrary);
  mountAddModels($('models-add-body'), 'models');

  const before = DR.pageHooks.models;
  DR.pageHooks.models = async () => {
    await Promise.all([before ? before() : null, loadLibrary()]);
  };
})();
