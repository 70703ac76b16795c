/* Darkroom browser UI — the Generate form's extra sections: hires fix, variation seed,
 * VAE, extra networks (LoRAs and embeddings), prompt styles, seamless tiling and the X/Y grid.
 * (The Extras page, upscaling, is upscale.js.)
 * Loaded (defer) after img2img.js; adds its fields to the request through
 * DR.formExtensions and its lists through DR.loaders (both in app.js).
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, showError, fillSelect, intOr, floatOr } = DR;
  const has = (req, k) => req[k] !== undefined && req[k] !== null;

  /** A collapsible section opens when its feature is switched on (and shows it in its summary). */
  function openWhenChecked(boxId, sectionId) {
    $(boxId).addEventListener('change', () => { if ($(boxId).checked) $(sectionId).open = true; });
  }

  // ================================================================== hires fix

  function baseSize() {
    const side = (id) => {
      const box = $(id);
      return intOr(box.value, intOr(box.placeholder, 0));
    };
    return [side('width'), side('height')];
  }

  /** The second pass's size, as GenerationRequest.hires_size() computes it. */
  function hiresSize(w, h) {
    const rx = intOr($('hr-resize-x').value, 0), ry = intOr($('hr-resize-y').value, 0);
    if (rx || ry) {
      if (!w || !h) return [rx || 0, ry || 0];
      return [rx || Math.floor((w * ry) / h / 8) * 8, ry || Math.floor((h * rx) / w / 8) * 8];
    }
    const s = Math.min(4, Math.max(1, floatOr($('hr-scale').value, 2)));
    return [Math.floor((w * s) / 8) * 8, Math.floor((h * s) / 8) * 8];
  }

  function updateHires() {
    const on = $('hires-enable').checked;
    const [w, h] = baseSize();
    const info = $('hr-size');
    if (!w || !h) {
      info.textContent = on ? `native size → ×${floatOr($('hr-scale').value, 2)}` : '';
    } else {
      const [W, H] = hiresSize(w, h);
      info.textContent = `${w}x${h} → ${W}x${H}`;
    }
    info.classList.toggle('off', !on);
    $('hires-section').classList.toggle('on', on);
  }

  // ================================================================== variation seed

  function readSubseed() {
    const raw = $('subseed').value.trim();
    if (!/^-?\d+$/.test(raw)) return -1;
    const n = Number(raw);
    return Number.isSafeInteger(n) ? n : raw; // a 64-bit seed as digits (the server reads numeric strings)
  }

  function updateVariation() {
    const s = floatOr($('subseed-strength').value, 0);
    $('variation-info').textContent = s > 0 ? `strength ${s}` : '';
    $('variation-section').classList.toggle('on', s > 0);
  }

  // ================================================================== VAE

  async function loadVaes() {
    const list = await api('/api/vaes');
    const names = Array.isArray(list) ? list.map((v) => (typeof v === 'string' ? v : v && v.name)).filter(Boolean) : [];
    fillSelect($('vae'), [['', 'Automatic'], ...names.map((n) => [n, n])]);
  }

  // ================================================================== extra networks

  const N = { loras: [], embeddings: { loaded: [], skipped: [] }, loading: null };

  async function loadNetworks() {
    if (N.loading) return N.loading;
    N.loading = (async () => {
      const [loras, embeddings] = await Promise.all([api('/api/loras'), api('/api/embeddings')]);
      N.loras = Array.isArray(loras) ? loras : [];
      N.embeddings = { loaded: (embeddings && embeddings.loaded) || [], skipped: (embeddings && embeddings.skipped) || [] };
      renderNetworks();
    })();
    try { await N.loading; } finally { N.loading = null; }
  }

  /** Insert text at the prompt's cursor (its end if it was never focused), with separators. */
  function insertIntoPrompt(text, sep) {
    const ta = $('prompt');
    const v = ta.value;
    const a = Number.isInteger(ta.selectionStart) ? ta.selectionStart : v.length;
    const b = Number.isInteger(ta.selectionEnd) ? ta.selectionEnd : v.length;
    const before = v.slice(0, a), after = v.slice(b);
    let pre = '';
    if (before && !/\s$/.test(before)) pre = sep === ', ' && !/[,(]$/.test(before) ? ', ' : ' ';
    const post = after && !/^[\s,)]/.test(after) ? (sep === ', ' ? ', ' : ' ') : '';
    ta.value = before + pre + text + post + after;
    const caret = (before + pre + text).length;
    ta.setSelectionRange(caret, caret);
    ta.dispatchEvent(new Event('input', { bubbles: true })); // saved like typing
  }

  function flash(node) {
    node.classList.remove('added');
    void node.offsetWidth; // restart the animation
    node.classList.add('added');
  }

  function renderNetworks() {
    const q = $('networks-search').value.trim().toLowerCase();
    const match = (...texts) => !q || texts.some((t) => t && String(t).toLowerCase().includes(q));

    const loras = N.loras.filter((l) => match(l.name, l.alias, l.base, ...(l.trigger_words || []),
      l.card && l.card.title, l.card && l.card.activation_text));
    const lbox = $('lora-list');
    if (!loras.length) {
      lbox.replaceChildren(el('p', { className: 'muted network-empty' },
        N.loras.length ? 'No LoRA matches the filter.' : 'No LoRAs found. Put .safetensors LoRA files in the loras folder and press Refresh.'));
    } else {
      lbox.replaceChildren(...loras.map((l) => {
        // As the webui does: its card's preferred weight (else 1), then its activation text after the tag.
        const mc = l.card || {};
        const tag = `<lora:${l.name}:${mc.preferred_weight || 1}>`;
        const insert = mc.activation_text ? `${tag} ${mc.activation_text}` : tag;
        const card = el('button', { type: 'button', className: 'network-card lora-card', title: `Add ${insert} to the prompt` + (mc.description ? `\n\n${mc.description}` : '') },
          el('span', { className: 'network-name', textContent: l.name }),
          l.alias && l.alias !== l.name ? el('span', { className: 'network-alias muted', textContent: l.alias }) : null,
          mc.title ? el('span', { className: 'network-alias muted', textContent: mc.title }) : null,
          el('span', { className: 'network-meta' },
            l.base ? el('span', { className: 'badge badge-base', textContent: l.base }) : null,
            l.hash ? el('span', { className: 'mono muted', textContent: String(l.hash).slice(0, 10) }) : null));
        card.dataset.name = l.name;
        if (l.error) {
          card.classList.add('network-error');
          card.title = `${l.name}: ${l.error}`;
          card.append(el('span', { className: 'network-meta error-text', textContent: l.error }));
        }
        card.addEventListener('click', () => { insertIntoPrompt(insert, ' '); flash(card); });
        const words = (l.trigger_words || []).filter(Boolean).map((w) => {
          const b = el('button', { type: 'button', className: 'trigger-word', title: `Add “${w}” to the prompt`, textContent: w });
          b.addEventListener('click', () => { insertIntoPrompt(w, ', '); flash(b); });
          return b;
        });
        return el('div', { className: 'network-item' }, card,
          words.length ? el('div', { className: 'trigger-words', 'aria-label': `Trigger words of ${l.name}` }, ...words) : null);
      }));
    }

    const loaded = N.embeddings.loaded.filter((e) => match(e.name));
    const skipped = N.embeddings.skipped.filter((e) => match(e.name, e.reason));
    const ebox = $('embedding-list');
    const nodes = loaded.map((e) => {
      const b = el('button', { type: 'button', className: 'network-card embedding-card', title: `Add ${e.name} to the prompt` },
        el('span', { className: 'network-name', textContent: e.name }),
        e.vectors ? el('span', { className: 'muted network-meta', textContent: `${e.vectors} vector${e.vectors === 1 ? '' : 's'}` }) : null);
      b.dataset.name = e.name;
      b.addEventListener('click', () => { insertIntoPrompt(e.name, ', '); flash(b); });
      return b;
    });
    for (const e of skipped) {
      nodes.push(el('span', { className: 'network-skipped', title: e.reason || 'not usable with this model' },
        el('span', { className: 'network-name', textContent: e.name }),
        el('span', { className: 'muted network-meta', textContent: e.reason || 'skipped' })));
    }
    if (!nodes.length) {
      nodes.push(el('p', { className: 'muted network-empty' },
        N.embeddings.loaded.length || N.embeddings.skipped.length ? 'No embedding matches the filter.' : 'No embeddings found.'));
    }
    ebox.replaceChildren(...nodes);

    const nl = N.loras.length, ne = N.embeddings.loaded.length;
    $('networks-count').textContent = `${nl} LoRA${nl === 1 ? '' : 's'} · ${ne} embedding${ne === 1 ? '' : 's'}`;
  }

  // ================================================================== prompt styles

  /* The webui's styles.csv styles (GET /api/styles), picked by checkbox; the request's `styles`
   * lists them in the order they were checked (the server applies them in that order). With no
   * styles at all the picker is hidden and a hint says where styles.csv goes. */
  const ST = { list: null, selected: [], loading: null, home: null };

  async function loadStyles() {
    if (ST.loading) return ST.loading;
    ST.loading = (async () => {
      const list = await api('/api/styles');
      ST.list = Array.isArray(list) ? list.filter((x) => x && typeof x.name === 'string') : [];
      if (!ST.list.length && ST.home === null) {
        try { ST.home = (await api('/sdapi/v1/cmd-flags')).data_dir || ''; } catch (e) { ST.home = ''; }
      }
      renderStyles();
    })();
    try { await ST.loading; } finally { ST.loading = null; }
  }

  const styleByName = (name) => (ST.list || []).find((x) => x.name === name) || null;

  function renderStyles() {
    const none = ST.list !== null && !ST.list.length;
    $('styles-section').hidden = ST.list === null || none;
    $('styles-hint').hidden = !none;
    if (none && ST.home) {
      $('styles-hint-text').replaceChildren('No prompt styles yet: put a ', el('code', {}, 'styles.csv'),
        ' (columns name, prompt, negative_prompt, as AUTOMATIC1111 writes it) in ',
        el('code', { className: 'styles-path' }, ST.home), '.');
    }
    const q = $('styles-search').value.trim().toLowerCase();
    const shown = (ST.list || []).filter((x) => !q || ST.selected.includes(x.name)
      || [x.name, x.prompt, x.negative_prompt, x.description].some((t) => t && String(t).toLowerCase().includes(q)));
    const box = $('style-list');
    if (!shown.length) {
      box.replaceChildren(el('p', { className: 'muted network-empty' }, 'No style matches the filter.'));
    } else {
      box.replaceChildren(...shown.map((x) => {
        const box = el('input', { type: 'checkbox', value: x.name, checked: ST.selected.includes(x.name) });
        box.addEventListener('change', () => toggleStyle(x.name, box.checked));
        const tip = [x.description, x.prompt && `Prompt: ${x.prompt}`, x.negative_prompt && `Negative: ${x.negative_prompt}`]
          .filter(Boolean).join('\n');
        const chip = el('label', { className: 'style-chip', title: tip || x.name }, box,
          el('span', { className: 'network-name', textContent: x.name }));
        chip.dataset.name = x.name;
        return chip;
      }));
    }
    updateStylesInfo();
  }

  function updateStylesInfo() {
    const n = ST.selected.length;
    $('styles-info').textContent = n ? ST.selected.join(', ') : '';
    $('styles-section').classList.toggle('on', n > 0);
  }

  function toggleStyle(name, on) {
    ST.selected = ST.selected.filter((x) => x !== name);
    if (on) ST.selected.push(name);
    updateStylesInfo();
    DR.saveSoon();
  }

  /** Selected styles from a request; names the server does not list are dropped (with a note). */
  function applyStyles(names, notes, restoring) {
    const known = ST.list === null ? names : names.filter((n) => styleByName(n));
    if (ST.list !== null && !restoring) for (const n of names) if (!styleByName(n)) notes.push(`style ${n} not found`);
    ST.selected = [...new Set(known)];
    if (ST.selected.length) $('styles-section').open = true;
    if (ST.list !== null) renderStyles(); else updateStylesInfo();
  }

  // ================================================================== X/Y grid

  const X = { axes: [] };

  async function loadAxes() {
    const list = await api('/api/xy/axes');
    X.axes = Array.isArray(list) ? list.filter((a) => a && a.name) : [];
    const opts = X.axes.map((a) => [a.name, a.name]);
    const pick = (sel, prefer) => {
      const keep = sel.value;
      fillSelect(sel, opts);
      if (!keep) {
        const p = prefer.find((n) => X.axes.some((a) => a.name === n));
        if (p) sel.value = p;
      }
    };
    pick($('xy-x-axis'), ['Steps', 'Seed']);
    pick($('xy-y-axis'), ['CFG Scale', 'Sampler']);
    updateXY();
  }

  const axisOf = (name) => X.axes.find((a) => a.name === name) || null;

  function updateXY() {
    for (const k of ['x', 'y']) {
      const a = axisOf($(`xy-${k}-axis`).value);
      $(`xy-${k}-values`).placeholder = a && a.example ? a.example : '';
    }
    const on = $('xy-enable').checked;
    const parts = [];
    if (on) {
      for (const k of ['x', 'y']) {
        if ($(`xy-${k}-values`).value.trim()) parts.push(`${k.toUpperCase()}: ${$(`xy-${k}-axis`).value}`);
      }
    }
    $('xy-info').textContent = parts.join(' · ');
    $('xy-section').classList.toggle('on', on);
  }

  function readXY(submit) {
    const ui = { enabled: $('xy-enable').checked };
    const xy = {};
    for (const k of ['x', 'y']) {
      const name = $(`xy-${k}-axis`).value;
      const values = $(`xy-${k}-values`).value.trim();
      ui[k] = name;
      ui[`${k}_values`] = $(`xy-${k}-values`).value;
      if (values && name) {
        const a = axisOf(name);
        xy[k] = `${(a && a.field) || name}=${values}`;
      }
    }
    if (!submit) return { xy_ui: ui };
    if (!ui.enabled) return {};
    if (!xy.x && !xy.y) throw new Error('X/Y grid: enter values for the X axis, the Y axis or both (or switch the grid off)');
    return { xy };
  }

  function applyXY(ui) {
    if (!ui || typeof ui !== 'object') return;
    $('xy-enable').checked = !!ui.enabled;
    for (const k of ['x', 'y']) {
      if (ui[k] && axisOf(ui[k])) $(`xy-${k}-axis`).value = ui[k];
      else if (ui[k] && !X.axes.length) { /* the list is not loaded yet: applied again after it is */ }
      if (typeof ui[`${k}_values`] === 'string') $(`xy-${k}-values`).value = ui[`${k}_values`];
    }
    if (ui.enabled) $('xy-section').open = true;
    updateXY();
  }

  // ================================================================== form extension

  DR.formExtensions.push({
    read(req, { submit }) {
      const img2img = DR.isImg2img && DR.isImg2img();
      Object.assign(req, {
        enable_hr: $('hires-enable').checked && !(submit && img2img),
        hr_scale: Math.min(4, Math.max(1, floatOr($('hr-scale').value, 2))),
        hr_upscaler: $('hr-upscaler').value || 'Latent',
        hr_second_pass_steps: Math.max(0, intOr($('hr-steps').value, 0)),
        hr_resize_x: Math.max(0, intOr($('hr-resize-x').value, 0)),
        hr_resize_y: Math.max(0, intOr($('hr-resize-y').value, 0)),
        subseed: readSubseed(),
        subseed_strength: Math.min(1, Math.max(0, floatOr($('subseed-strength').value, 0))),
        vae: $('vae').value || null,
        styles: [...ST.selected],
        tiling: $('tiling').checked,
        // 0 leaves it to the token_merging_ratio setting (0 unless an A1111 client stored another)
        token_merging_ratio: Math.min(0.9, Math.max(0, floatOr($('token-merging').value, 0))) || null,
      }, readXY(submit));
    },
    apply(req, notes, { restoring }) {
      if (has(req, 'enable_hr')) {
        $('hires-enable').checked = !!req.enable_hr;
        if (req.enable_hr) $('hires-section').open = true;
      }
      if (has(req, 'hr_scale')) $('hr-scale').value = req.hr_scale;
      if (has(req, 'hr_upscaler')) {
        if ([...$('hr-upscaler').options].some((o) => o.value === req.hr_upscaler)) $('hr-upscaler').value = req.hr_upscaler;
        else notes.push(`hires upscaler ${req.hr_upscaler} not available`);
      }
      if (has(req, 'hr_second_pass_steps')) $('hr-steps').value = req.hr_second_pass_steps;
      if (has(req, 'hr_resize_x')) $('hr-resize-x').value = req.hr_resize_x;
      if (has(req, 'hr_resize_y')) $('hr-resize-y').value = req.hr_resize_y;
      if (has(req, 'subseed')) $('subseed').value = String(req.subseed);
      if (has(req, 'subseed_strength')) {
        $('subseed-strength').value = req.subseed_strength;
        if (req.subseed_strength > 0) $('variation-section').open = true;
      }
      if (req.vae !== undefined) {
        const v = req.vae || '';
        if ([...$('vae').options].some((o) => o.value === v)) $('vae').value = v;
        else if ($('vae').options.length > 1 || !restoring) notes.push(`VAE ${v} not found`);
      }
      if (has(req, 'tiling')) $('tiling').checked = !!req.tiling;
      if (req.token_merging_ratio !== undefined) $('token-merging').value = req.token_merging_ratio || 0;
      // a request without styles (e.g. from an image's infotext, whose prompt has them applied) clears them
      if (Array.isArray(req.styles)) applyStyles(req.styles.filter((n) => typeof n === 'string'), notes, restoring);
      else if (!restoring) applyStyles([], notes, restoring);
      if (restoring) applyXY(req.xy_ui);
      updateHires();
      updateVariation();
    },
  });

  DR.loaders.push(loadVaes, loadNetworks, loadAxes, loadStyles);
  DR.onSize.push(updateHires);

  // ================================================================== wiring

  openWhenChecked('hires-enable', 'hires-section');
  openWhenChecked('xy-enable', 'xy-section');
  for (const id of ['hires-enable', 'hr-scale', 'hr-resize-x', 'hr-resize-y']) {
    $(id).addEventListener('input', updateHires);
    $(id).addEventListener('change', updateHires);
  }
  DR.onModels.push(updateHires);
  $('subseed-strength').addEventListener('input', updateVariation);
  for (const id of ['xy-enable', 'xy-x-axis', 'xy-y-axis', 'xy-x-values', 'xy-y-values']) {
    $(id).addEventListener('input', updateXY);
    $(id).addEventListener('change', updateXY);
  }
  let searchTimer = null;
  $('networks-search').addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(renderNetworks, 120);
  });
  // the search box is in the form: Enter must not submit it
  $('networks-search').addEventListener('keydown', (e) => { if (e.key === 'Enter') e.preventDefault(); });
  $('networks-refresh').addEventListener('click', async () => {
    const btn = $('networks-refresh');
    btn.disabled = true;
    try { await loadNetworks(); } catch (e) { showError(e); } finally { btn.disabled = false; }
  });
  $('networks').addEventListener('toggle', () => {
    if ($('networks').open) loadNetworks().catch(showError); // pick up files added since
  });
  $('styles-search').addEventListener('input', renderStyles);
  $('styles-search').addEventListener('keydown', (e) => { if (e.key === 'Enter') e.preventDefault(); });
  for (const id of ['styles-refresh', 'styles-recheck']) {
    $(id).addEventListener('click', async () => {
      const btn = $(id);
      btn.disabled = true;
      try { await loadStyles(); } catch (e) { showError(e); } finally { btn.disabled = false; }
      if (ST.list && ST.list.length && id === 'styles-recheck') {
        $('styles-section').open = true;
        $('styles-section').querySelector('summary').focus();
      }
    });
  }
  $('styles-section').addEventListener('toggle', () => {
    if ($('styles-section').open) loadStyles().catch(showError); // pick up edits to styles.csv
  });
  // (these inputs live in the form: its input/change listeners in app.js save them)
  updateHires();
  updateVariation();
})();
