/* Darkroom browser UI — the ControlNet section of the Generate form (txt2img and img2img): up to
 * three units, each with a control image (a file, a dropped result, or one drawn on a canvas: white
 * strokes on black, the outlines the built-in starter ControlNet follows), a preprocessor and a
 * model from GET /api/controlnet, weight, start/end, modes and the preprocessor's sliders, and a
 * preview of the detected map (POST /api/controlnet/detect). Units go out as the request's
 * `controlnet` list; "Use these settings" brings them back from a request or the infotext's
 * `ControlNet N: "Module: ..., Model: ..."` lines, with the control map Darkroom stores in the
 * picture's PNG (compressed text chunks `darkroom-controlnet-N`) as the unit's image.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, toast, showError } = DR;
  const isResultDrag = (e) => Boolean(e.dataTransfer) && [...(e.dataTransfer.types || [])].includes(DR.IMAGE_TYPE);
  const UNITS = 3;
  const CONTROL_MODES = ['Balanced', 'My prompt is more important', 'ControlNet is more important'];
  const RESIZE_MODES = ['Just Resize', 'Crop and Resize', 'Resize and Fill'];
  const HR_OPTIONS = ['Both', 'Low res only', 'High res only'];
  // a ControlNet Union model's control types in its index order (darkroom.control_unit.UNION_CONTROL_TYPES)
  const UNION_TYPES = ['OpenPose', 'Depth', 'Soft Edge', 'Hard Edge', 'Normal Map', 'Segmentation', 'Tile', 'Inpaint'];
  const NO_IMAGES = 'ControlNet units restored without their control images';
  const DRAW_SIDE = 512; // px, the longer side of a drawing canvas (the server fits the map to the picture)

  const HELP = {
    enabled: 'Turn this unit on. Up to three units steer one picture together; each needs a model and, in text to '
      + 'image, a control image (in image to image a unit without one uses the source image).',
    image: 'The picture this unit follows: a photo for the preprocessor to turn into a map, or a ready map such as '
      + 'edges or a scribble. Drop one here (a result too), choose a file, or draw one.',
    brush: 'Width of the drawing brush. Draw white outlines on black: the built-in starter ControlNet is trained on '
      + 'drawn outlines like these, with "none" as the preprocessor.',
    pen: 'Colour of the brush. Edge, scribble and line models, and the built-in starter ControlNet, read white lines '
      + 'on black; segmentation and colour models read colours (a segmentation map\'s colours name what goes there).',
    module: 'The preprocessor turns the control image into the map the model reads: canny finds edges, invert turns '
      + 'black lines on white into white on black. "none" uses the image as it is (a drawing or a ready map). '
      + 'Greyed-out ones need a file this install does not have.',
    model: 'The ControlNet model. It must be made for the checkpoint\'s family (SD 1.x, SDXL) and for the kind of '
      + 'map (a canny model for canny edges).',
    weight: 'How strongly the map steers the picture: 1 is full strength, lower leaves the prompt more freedom.',
    start: 'When the unit starts steering, as a fraction of the steps: 0 is from the first step.',
    end: 'When it stops steering: ending early (say 0.7) keeps the layout from the map and leaves the details to the prompt.',
    control_mode: 'Balanced treats the prompt and the map alike. "My prompt is more important" lets the prompt win '
      + 'where they disagree; "ControlNet is more important" holds the map more strictly.',
    resize_mode: 'How a control image of another shape meets the picture: stretched (Just Resize), cropped to fill '
      + '(Crop and Resize) or fitted inside and padded (Resize and Fill).',
    pixel_perfect: 'Run the preprocessor at the picture\'s own resolution instead of the resolution slider, so the '
      + 'map lines up with the picture pixel for pixel.',
    union_type: 'A ControlNet Union model draws every kind of map and must be told which kind this one is. '
      + '"Unknown" picks it from the preprocessor (canny: Hard Edge, depth: Depth); with "none" choose it here.',
    hr_option: 'With the hires fix on: steer both passes, only the first (low resolution) or only the second.',
    processor_res: 'The resolution the preprocessor works at: higher finds finer detail and takes longer.',
    slider: 'A setting of this preprocessor (for canny, the edge thresholds: lower values find more edges).',
    preview: 'Run the preprocessor now and show the map the model will see; "Use map as control image" keeps it.',
    more: 'More pictures for this unit, beside its control image. Choose several files at once; each is kept in the '
      + 'order chosen.',
    more_mode: '"Merge" gives the unit all its pictures at once: an IP-Adapter averages them, any other unit runs once '
      + 'per picture at a share of the weight. "Batch" runs the whole job once per picture (the control image '
      + 'first), each run with the same seed: for a sequence of frames or poses.',
  };

  const C = { models: [], modules: [], units: [], active: 0, section: null };

  // ------------------------------------------------------------------ building blocks

  /** A "?" button toggling a help text tied to `control` (as help.js does for the other settings). */
  function helpFor(control, key, name) {
    const id = `help-${control.id}`;
    const p = el('p', { className: 'help-text', id, textContent: HELP[key], hidden: true });
    const btn = el('button', { type: 'button', className: 'help-btn', textContent: '?', title: `What is ${name}?`,
      'aria-label': `Help: ${name}`, 'aria-expanded': 'false', 'aria-controls': id });
    btn.addEventListener('click', () => {
      p.hidden = !p.hidden;
      btn.setAttribute('aria-expanded', String(!p.hidden));
    });
    const described = (control.getAttribute('aria-describedby') || '').split(/\s+/).filter(Boolean);
    control.setAttribute('aria-describedby', [...described, id].join(' '));
    return { btn, p };
  }

  /** <div class="field"><div class="label-row"><label for>NAME</label>?</div>CONTROL help</div> */
  function field(name, control, key, extra = null) {
    const h = helpFor(control, key, name);
    return el('div', { className: 'field' },
      el('div', { className: 'label-row' }, el('label', { className: 'label', htmlFor: control.id, textContent: name }), h.btn),
      extra || control, h.p);
  }

  function checkField(name, control, key) {
    const h = helpFor(control, key, name);
    return el('div', { className: 'help-check' }, el('label', { className: 'check' }, control, el('span', { textContent: name })), h.btn, h.p);
  }

  const select = (id, values) => el('select', { id }, ...values.map((v) => el('option', { value: v, textContent: v })));

  /** A range with a number box beside it, kept in step. */
  function slider(id, name, { min, max, step, value }) {
    const range = el('input', { type: 'range', id, min: String(min), max: String(max), step: String(step), value: String(value) });
    const num = el('input', { type: 'number', id: `${id}-value`, className: 'slider-number', min: String(min), max: String(max),
      step: String(step), value: String(value), inputmode: 'decimal', 'aria-label': `${name} value` });
    range.addEventListener('input', () => { num.value = range.value; });
    num.addEventListener('input', () => { if (num.value !== '') range.value = num.value; });
    return { range, num, row: el('div', { className: 'inline slider-row' }, range, num) };
  }

  // ------------------------------------------------------------------ one unit

  function makeUnit(i) {
    const id = (name) => `cn${i}-${name}`;
    const u = { i, image: null, mode: 'image', drawn: false, sliders: [], map: null, prepared: false };
    u.enabled = el('input', { type: 'checkbox', id: id('enabled') });
    u.file = el('input', { type: 'file', id: id('file'), className: 'sr-only', tabIndex: -1, accept: 'image/png,image/jpeg,image/webp',
      'aria-label': `Choose a control image for unit ${i + 1}` });
    u.img = el('img', { className: 'cn-image', id: id('image'), alt: `Control image of unit ${i + 1}`, hidden: true });
    u.canvas = el('canvas', { className: 'cn-canvas', id: id('canvas'), role: 'img', hidden: true,
      'aria-label': `Drawing of unit ${i + 1}: strokes on black` });
    u.hint = el('p', { className: 'cn-hint', textContent: 'Drop an image here, choose a file, or draw one.' });
    const pick = el('button', { type: 'button', className: 'btn btn-small', id: id('pick'), textContent: 'Choose image…' });
    const draw = el('button', { type: 'button', className: 'btn btn-small', id: id('draw'), textContent: 'Draw' });
    u.clear = el('button', { type: 'button', className: 'btn btn-small', id: id('clear'), textContent: 'Clear drawing', hidden: true });
    u.remove = el('button', { type: 'button', className: 'btn btn-small', id: id('remove'), textContent: 'Remove', hidden: true });
    u.brush = slider(id('brush'), 'Brush size', { min: 2, max: 64, step: 1, value: 12 });
    u.pen = el('input', { type: 'color', id: id('pen'), value: '#ffffff' });
    u.brushField = el('div', { className: 'cn-brush-row' }, field('Brush size', u.brush.range, 'brush', u.brush.row),
      field('Brush colour', u.pen, 'pen'));
    u.brushField.hidden = true;
    u.more = [];
    u.moreFile = el('input', { type: 'file', id: id('more-file'), className: 'sr-only', tabIndex: -1, multiple: true,
      accept: 'image/png,image/jpeg,image/webp', 'aria-label': `Add more pictures to unit ${i + 1}` });
    const morePick = el('button', { type: 'button', className: 'btn btn-small', id: id('more-pick'), textContent: 'Add pictures…' });
    u.moreClear = el('button', { type: 'button', className: 'btn btn-small', id: id('more-clear'), textContent: 'Clear them', hidden: true });
    u.moreCount = el('span', { className: 'muted', id: id('more-count'), textContent: 'none', 'aria-live': 'polite' });
    u.moreList = el('div', { className: 'cn-more-list', id: id('more-list') });
    u.moreMode = select(id('more-mode'), ['merge', 'batch']);
    u.moreMode.options[0].textContent = 'Merge into this unit';
    u.moreMode.options[1].textContent = 'Batch: one run per picture';
    const moreHelp = helpFor(morePick, 'more', 'More pictures');
    u.moreModeField = field('Use them as', u.moreMode, 'more_mode');
    u.moreModeField.hidden = true;
    u.drop = el('div', { className: 'drop-zone cn-drop', id: id('drop') }, u.hint, u.img, u.canvas,
      el('div', { className: 'inline cn-filebar' }, u.file, pick, draw, u.clear, u.remove));
    const imageHelp = helpFor(u.file, 'image', 'Control image');
    pick.setAttribute('aria-describedby', imageHelp.p.id);

    u.module = el('select', { id: id('module') });
    u.model = el('select', { id: id('model') });
    u.weight = slider(id('weight'), 'Control weight', { min: 0, max: 2, step: 0.05, value: 1 });
    u.start = slider(id('start'), 'Starting step', { min: 0, max: 1, step: 0.01, value: 0 });
    u.end = slider(id('end'), 'Ending step', { min: 0, max: 1, step: 0.01, value: 1 });
    u.controlMode = select(id('control-mode'), CONTROL_MODES);
    u.resizeMode = select(id('resize-mode'), RESIZE_MODES);
    u.resizeMode.value = 'Crop and Resize';
    u.hrOption = select(id('hr-option'), HR_OPTIONS);
    u.unionType = select(id('union-type'), ['Unknown', ...UNION_TYPES]);
    u.unionField = field('Control type', u.unionType, 'union_type');
    u.unionField.hidden = true; // only for a union model
    u.pixelPerfect = el('input', { type: 'checkbox', id: id('pixel-perfect') });
    u.sliderBox = el('div', { className: 'cn-sliders section-body grid' });
    u.previewBtn = el('button', { type: 'button', className: 'btn btn-small', id: id('preview'), textContent: 'Preview map' });
    const previewHelp = helpFor(u.previewBtn, 'preview', 'Preview map');
    u.mapImg = el('img', { className: 'cn-map', id: id('map'), alt: `Detected map of unit ${i + 1}`, hidden: true });
    u.useMap = el('button', { type: 'button', className: 'btn btn-small', id: id('use-map'), textContent: 'Use map as control image', hidden: true });

    u.panel = el('div', { className: 'cn-panel', role: 'tabpanel', id: `cn-panel-${i}`, 'aria-labelledby': `cn-tab-${i}`, hidden: i !== 0 },
      checkField(`Enable unit ${i + 1}`, u.enabled, 'enabled'),
      el('div', { className: 'cn-image-row' },
        el('div', { className: 'label-row' }, el('span', { className: 'label', textContent: 'Control image' }), imageHelp.btn),
        u.drop, imageHelp.p, u.brushField),
      el('div', { className: 'cn-more' },
        el('div', { className: 'label-row' }, el('span', { className: 'label', textContent: 'More pictures' }), moreHelp.btn),
        el('div', { className: 'inline cn-more-bar' }, u.moreFile, morePick, u.moreClear, u.moreCount),
        moreHelp.p, u.moreList, u.moreModeField),
      el('div', { className: 'section-body grid cn-grid' },
        field('Preprocessor', u.module, 'module'),
        field('Model', u.model, 'model'),
        u.unionField,
        field('Control weight', u.weight.range, 'weight', u.weight.row),
        field('Control mode', u.controlMode, 'control_mode'),
        field('Starting step', u.start.range, 'start', u.start.row),
        field('Ending step', u.end.range, 'end', u.end.row),
        field('Resize mode', u.resizeMode, 'resize_mode'),
        field('Hires fix passes', u.hrOption, 'hr_option'),
        checkField('Pixel perfect', u.pixelPerfect, 'pixel_perfect')),
      u.sliderBox,
      el('div', { className: 'inline cn-preview-bar' }, u.previewBtn, previewHelp.btn, u.useMap),
      previewHelp.p, u.mapImg);

    pick.addEventListener('click', () => u.file.click());
    u.file.addEventListener('change', () => { DR.loadImageFile(u.file.files[0], (url) => setImage(u, url)); u.file.value = ''; });
    DR.fileDropZone(u.drop, (f) => DR.loadImageFile(f, (url) => setImage(u, url)));
    u.drop.addEventListener('dragover', (e) => { if (isResultDrag(e)) { e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; } });
    u.drop.addEventListener('drop', (e) => {
      const url = isResultDrag(e) ? e.dataTransfer.getData(DR.IMAGE_TYPE) : null;
      if (url) useAsControl(url, i);
    });
    morePick.addEventListener('click', () => u.moreFile.click());
    u.moreFile.addEventListener('change', async () => {
      for (const f of [...u.moreFile.files]) await DR.loadImageFile(f, (url) => { u.more.push(url); });
      u.moreFile.value = '';
      showMore(u);
      changed();
    });
    u.moreClear.addEventListener('click', () => { u.more = []; showMore(u); changed(); });
    u.moreMode.addEventListener('change', changed);
    draw.addEventListener('click', () => startDrawing(u));
    u.clear.addEventListener('click', () => { blank(u); u.drawn = false; changed(); });
    u.remove.addEventListener('click', () => { u.image = null; u.prepared = false; u.mode = 'image'; u.drawn = false; showImage(u); changed(); });
    bindCanvas(u);
    u.module.addEventListener('change', () => { u.prepared = false; buildSliders(u); changed(); });
    u.model.addEventListener('change', () => { syncUnion(u); changed(); });
    u.pixelPerfect.addEventListener('change', () => { syncPixelPerfect(u); changed(); });
    u.enabled.addEventListener('change', changed);
    u.previewBtn.addEventListener('click', () => preview(u));
    u.useMap.addEventListener('click', () => {
      setImage(u, u.map);
      u.module.value = 'none'; // the map is the control already: no second detection
      buildSliders(u);
      changed();
    });
    u.panel.addEventListener('input', () => DR.saveSoon());
    return u;
  }

  // ------------------------------------------------------------------ the control image

  async function setImage(u, url) {
    const probe = new Image();
    probe.src = url;
    try { await probe.decode(); } catch (e) { throw new Error('control image: not a readable image; use a PNG, JPEG or WebP'); }
    u.image = url;
    u.prepared = false; // a new picture is preprocessed (restoreMaps marks a stored map afterwards)
    u.mode = 'image';
    showImage(u);
  }

  function showImage(u) {
    const drawing = u.mode === 'draw';
    u.img.hidden = drawing || !u.image;
    if (u.image) u.img.src = u.image; else u.img.removeAttribute('src');
    u.canvas.hidden = !drawing;
    u.clear.hidden = !drawing;
    u.brushField.hidden = !drawing;
    u.remove.hidden = !drawing && !u.image;
    u.hint.hidden = drawing || Boolean(u.image);
    u.drop.classList.toggle('loaded', drawing || Boolean(u.image));
  }

  function showMore(u) {
    const n = u.more.length;
    u.moreList.replaceChildren(...u.more.map((url, k) => el('img', { className: 'cn-more-thumb', src: url,
      alt: `Picture ${k + 2} of unit ${u.i + 1}` })));
    u.moreCount.textContent = n ? `${n} more picture${n === 1 ? '' : 's'}` : 'none';
    u.moreClear.hidden = !n;
    u.moreModeField.hidden = !n;
  }

  /** The generation size (the fields, else their placeholders: the model's or the source's size). */
  function genSize() {
    const v = (id) => parseInt($(id).value || $(id).placeholder, 10) || 512;
    return [v('width'), v('height')];
  }

  function startDrawing(u) {
    const [w, h] = genSize();
    const k = DRAW_SIDE / Math.max(w, h);
    u.canvas.width = Math.max(8, Math.round(w * k));
    u.canvas.height = Math.max(8, Math.round(h * k));
    blank(u);
    u.mode = 'draw';
    u.prepared = false;
    u.drawn = false;
    u.enabled.checked = true; // drawing is meant to be used
    showImage(u);
    changed();
  }

  function blank(u) {
    const ctx = u.canvas.getContext('2d');
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, u.canvas.width, u.canvas.height);
  }

  function bindCanvas(u) {
    const c = u.canvas;
    let last = null;
    const at = (e) => {
      const r = c.getBoundingClientRect();
      return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
    };
    const stroke = (a, b) => {
      const ctx = c.getContext('2d');
      ctx.strokeStyle = u.pen.value;
      ctx.lineCap = 'round';
      ctx.lineJoin = 'round';
      ctx.lineWidth = Number(u.brush.range.value) * c.width / DRAW_SIDE * (DRAW_SIDE / Math.max(c.width, c.height));
      ctx.beginPath();
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0] + 0.01, b[1]); // a click draws a dot
      ctx.stroke();
    };
    c.addEventListener('pointerdown', (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      c.setPointerCapture(e.pointerId);
      last = at(e);
      stroke(last, last);
    });
    c.addEventListener('pointermove', (e) => {
      if (!last) return;
      const p = at(e);
      stroke(last, p);
      last = p;
    });
    const end = () => { if (last) { last = null; u.drawn = true; changed(); } };
    c.addEventListener('pointerup', end);
    c.addEventListener('pointercancel', end);
  }

  /** The unit's control image as a data: URL (a drawing as PNG), or null. */
  function imageOf(u) {
    if (u.mode === 'draw') return u.drawn ? u.canvas.toDataURL('image/png') : null;
    return u.image;
  }

  // ------------------------------------------------------------------ preprocessors, models, sliders

  function fillPickers(u) {
    const module = u.module.value || 'none';
    u.module.replaceChildren(...C.modules.map((m) => el('option', {
      value: m.name, textContent: m.available ? (m.label === m.name ? m.name : `${m.name} (${m.label})`) : `${m.name} (unavailable)`,
      disabled: !m.available, title: m.problem || '' })));
    u.module.value = C.modules.some((m) => m.name === module && m.available) ? module : 'none';
    const model = u.model.value;
    u.model.replaceChildren(el('option', { value: '', textContent: 'None' }),
      ...C.models.map((m) => el('option', { value: m.title, textContent: modelLabel(m) })));
    if (C.models.some((m) => m.title === model)) u.model.value = model;
    else if (!model && C.models.length === 1) u.model.value = C.models[0].title; // the one there is
    syncUnion(u);
    // the same module keeps the values set (a refresh of the lists must not undo "Use these settings")
    const kept = u.module.value === module ? Object.fromEntries(u.sliders.map((s) => [s.key, Number(s.sl.range.value)])) : {};
    buildSliders(u, kept);
  }

  /** "name (SD1)", "name (SDXL, union)", "name (SD1, T2I-Adapter)": the family and what kind of model it is. */
  function modelLabel(m) {
    const family = { sd1: 'SD1', sd2: 'SD2', sdxl: 'SDXL', 'sdxl-refiner': 'SDXL refiner' }[m.family] || m.family;
    const notes = [family || null, m.union_types ? 'union' : null,
      m.kind && m.kind !== 'ControlNet' ? m.kind : null].filter(Boolean);
    return notes.length ? `${m.name} (${notes.join(', ')})` : m.name;
  }

  /** The control-type picker, shown for a union model with as many types as it knows (6, or 8 for promax). */
  function syncUnion(u) {
    const info = C.models.find((m) => m.title === u.model.value);
    const count = info && info.union_types ? info.union_types : 0;
    const keep = u.unionType.value;
    u.unionType.replaceChildren(...['Unknown', ...UNION_TYPES.slice(0, count)].map((v) => el('option', { value: v, textContent: v })));
    u.unionType.value = [...u.unionType.options].some((o) => o.value === keep) ? keep : 'Unknown';
    u.unionField.hidden = count === 0;
  }

  /** The module's sliders: a "Resolution" one is the preprocessor resolution, the others threshold A and B. */
  function buildSliders(u, values = {}) {
    const info = C.modules.find((m) => m.name === u.module.value);
    const list = ((info && info.sliders) || []).filter((s) => s && typeof s === 'object');
    u.sliders = [];
    const fields = [];
    let t = 0;
    for (const s of list) {
      const key = /resolution/i.test(s.name || '') ? 'processor_res' : ['threshold_a', 'threshold_b'][t++];
      if (!key) continue;
      const given = values[key];
      const value = typeof given === 'number' && given >= 0 ? given : s.value;
      const sl = slider(`cn${u.i}-${key.replace('_', '-')}`, s.name, { min: s.min, max: s.max, step: s.step || 1, value });
      const f = field(s.name, sl.range, key === 'processor_res' ? 'processor_res' : 'slider', sl.row);
      u.sliders.push({ key, sl, f });
      fields.push(f);
    }
    u.sliderBox.replaceChildren(...fields);
    u.sliderBox.hidden = !fields.length;
    syncPixelPerfect(u);
  }

  function syncPixelPerfect(u) {
    for (const s of u.sliders) if (s.key === 'processor_res') s.f.hidden = u.pixelPerfect.checked;
  }

  function sliderValue(u, key, dflt = -1) {
    const s = u.sliders.find((x) => x.key === key);
    return s ? Number(s.sl.range.value) : dflt;
  }

  async function load() {
    try {
      const r = await api('/api/controlnet');
      C.models = Array.isArray(r.models) ? r.models : [];
      C.modules = Array.isArray(r.modules) ? r.modules : [];
    } catch (e) {
      if (e.status !== 404) throw e; // a server without ControlNet: the section says so
      C.models = [];
      C.modules = [];
    }
    for (const u of C.units) fillPickers(u);
    $('cn-nomodels').hidden = C.models.length > 0;
    render(); // not saved: the form is restored after the lists load (app.js init)
  }

  // ------------------------------------------------------------------ preview, results

  async function preview(u) {
    const image = imageOf(u);
    if (!image) { toast(`Unit ${u.i + 1}: choose or draw a control image first`, 'error'); return; }
    const [w, h] = genSize();
    const res = u.pixelPerfect.checked ? Math.min(w, h) : sliderValue(u, 'processor_res', 512);
    u.previewBtn.disabled = true;
    try {
      const r = await api('/api/controlnet/detect', { method: 'POST', json: { module: u.module.value || 'none', image,
        resolution: Math.min(4096, Math.max(64, Math.round(res))), threshold_a: sliderValue(u, 'threshold_a'),
        threshold_b: sliderValue(u, 'threshold_b') } });
      u.map = r.image;
      u.mapImg.src = r.image;
      u.mapImg.hidden = false;
      u.useMap.hidden = false;
    } catch (e) {
      showError(e);
    } finally {
      u.previewBtn.disabled = false;
    }
  }

  /** "Use as control image" on a result: the image goes into the selected unit (or `index`), turned on. */
  async function useAsControl(url, index = C.active) {
    try {
      const res = await fetch(url, { credentials: 'same-origin' });
      if (!res.ok) throw new Error(`could not load the image (HTTP ${res.status})`);
      const u = C.units[index];
      await setImage(u, await DR.readAsDataURL(await res.blob()));
      u.enabled.checked = true;
      if (DR.currentPage !== 'generate') DR.showPage('generate');
      C.section.open = true;
      selectTab(index);
      changed();
      toast(`Control image of ControlNet unit ${index + 1} set`);
      u.drop.scrollIntoView({ block: 'nearest' });
    } catch (e) {
      showError(e.message === 'Failed to fetch' ? new Error('server unreachable') : e);
    }
  }

  // ------------------------------------------------------------------ maps stored in a result's PNG

  const latin1 = (bytes) => new TextDecoder('latin1').decode(bytes);

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    return latin1(new Uint8Array(await new Response(stream).arrayBuffer()));
  }

  /** unit number -> data: URL of the prepared map Darkroom wrote into the PNG at `url` (base64 PNG text in
   *  tEXt/zTXt chunks `darkroom-controlnet-N`, continued in `-pK` parts); {} when it has none. */
  async function storedMaps(url) {
    const res = await fetch(url, { credentials: 'same-origin' });
    if (!res.ok || !window.DecompressionStream) return {};
    const buf = new Uint8Array(await res.arrayBuffer());
    if (buf.length < 8 || latin1(buf.subarray(1, 4)) !== 'PNG') return {};
    const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const parts = {};
    for (let p = 8; p + 12 <= buf.length;) {
      const len = view.getUint32(p);
      const type = latin1(buf.subarray(p + 4, p + 8));
      const data = buf.subarray(p + 8, Math.min(buf.length, p + 8 + len));
      if (type === 'IEND') break;
      if (type === 'tEXt' || type === 'zTXt') {
        const nul = data.indexOf(0);
        const m = nul > 0 && /^darkroom-controlnet-(\d+)(?:-p(\d+))?$/.exec(latin1(data.subarray(0, nul)));
        if (m) {
          const text = type === 'tEXt' ? latin1(data.subarray(nul + 1)) : await inflate(data.subarray(nul + 2));
          (parts[m[1]] = parts[m[1]] || {})[Number(m[2] || 0)] = text;
        }
      }
      p += 12 + len;
    }
    const maps = {};
    for (const [unit, pieces] of Object.entries(parts)) {
      const n = Object.keys(pieces).length;
      if (Array.from({ length: n }, (_, i) => i in pieces).every(Boolean)) {
        maps[unit] = `data:image/png;base64,${Array.from({ length: n }, (_, i) => pieces[i]).join('')}`;
      }
    }
    return maps;
  }

  /** After "Use these settings": the units restored without an image get the map stored in the picture,
   *  sent `prepared` (used as it is, not detected again) with the picture's preprocessor kept for its infotext. */
  async function restoreMaps(url, numbers) {
    const want = C.units.filter((u) => u.enabled.checked && !imageOf(u));
    if (!want.length) return;
    let maps = {};
    try { maps = await storedMaps(url); } catch (e) { maps = {}; } // an unreadable file: the note stays
    let done = 0;
    for (const u of want) {
      const map = maps[numbers[u.i]];
      if (!map) continue;
      try { await setImage(u, map); } catch (e) { continue; }
      u.prepared = true;
      done += 1;
    }
    if (!done) return;
    const left = C.units.some((u) => u.enabled.checked && !imageOf(u));
    const note = $('form-note');
    if (!left && note) DR.showNotes(note.textContent.split(' · ').filter((t) => t && !t.startsWith(NO_IMAGES)));
    toast(`ControlNet map${done === 1 ? '' : 's'} restored from the picture (used as it is: not preprocessed again)`);
    render();
    DR.saveSoon();
  }

  // ------------------------------------------------------------------ section, tabs

  function changed() {
    render();
    DR.saveSoon();
  }

  function render() {
    const on = C.units.filter((u) => u.enabled.checked).length;
    $('cn-info').textContent = on ? `${on} unit${on === 1 ? '' : 's'} on` : 'off';
    C.section.classList.toggle('on', on > 0);
    C.units.forEach((u, i) => { $(`cn-tab-${i}`).textContent = `Unit ${i + 1}${u.enabled.checked ? ' · on' : ''}`; });
  }

  function selectTab(i) {
    C.active = i;
    C.units.forEach((u, k) => {
      const tab = $(`cn-tab-${k}`);
      tab.setAttribute('aria-selected', String(k === i));
      tab.tabIndex = k === i ? 0 : -1;
      u.panel.hidden = k !== i;
    });
  }

  function build() {
    const tabs = el('div', { className: 'cn-tabs', role: 'tablist', 'aria-label': 'ControlNet units' },
      ...Array.from({ length: UNITS }, (_, i) => el('button', { type: 'button', role: 'tab', id: `cn-tab-${i}`,
        className: 'cn-tab', 'aria-controls': `cn-panel-${i}`, 'aria-selected': String(i === 0), tabIndex: i === 0 ? 0 : -1,
        textContent: `Unit ${i + 1}` })));
    C.units = Array.from({ length: UNITS }, (_, i) => makeUnit(i));
    C.section = el('details', { className: 'section', id: 'controlnet-section' },
      el('summary', {}, el('span', { className: 'section-title', textContent: 'ControlNet' }), ' ',
        el('span', { className: 'muted section-info', id: 'cn-info', textContent: 'off' })),
      el('div', { className: 'section-body' },
        el('p', { className: 'muted cn-intro', textContent: 'Steer the picture with a control image: an outline, edges, '
          + 'a scribble. Draw one, or let a preprocessor find it in a picture.' }),
        el('p', { className: 'cn-nomodels muted', id: 'cn-nomodels', hidden: true, textContent: 'No ControlNet models yet: '
          + 'put ControlNet files in the models/controlnet folder of Darkroom\'s home, or add an A1111 or ComfyUI folder '
          + 'on the Models page, then open this section again.' }),
        tabs, ...C.units.map((u) => u.panel)));
    tabs.addEventListener('click', (e) => {
      const t = e.target.closest('[role=tab]');
      if (t) selectTab(Number(t.id.slice(-1)));
    });
    tabs.addEventListener('keydown', (e) => {
      const to = { ArrowRight: C.active + 1, ArrowLeft: C.active - 1, Home: 0, End: UNITS - 1 }[e.key];
      if (to === undefined) return;
      e.preventDefault();
      selectTab((to + UNITS) % UNITS);
      $(`cn-tab-${C.active}`).focus();
    });
    C.section.addEventListener('toggle', () => { if (C.section.open) load().catch(showError); }); // new files show up
    const at = $('hires-section').closest('.section-wrap') || $('hires-section'); // before the hires fix
    at.before(C.section);
    for (const u of C.units) { fillPickers(u); showImage(u); }
  }

  // ------------------------------------------------------------------ the request, "Use these settings"

  function settingsOf(u) {
    return { enabled: u.enabled.checked, model: u.model.value || 'None', module: u.module.value || 'none',
      weight: Number(u.weight.range.value), guidance_start: Number(u.start.range.value),
      guidance_end: Number(u.end.range.value), control_mode: u.controlMode.value, resize_mode: u.resizeMode.value,
      processor_res: sliderValue(u, 'processor_res', 512), threshold_a: sliderValue(u, 'threshold_a'),
      threshold_b: sliderValue(u, 'threshold_b'), pixel_perfect: u.pixelPerfect.checked, hr_option: u.hrOption.value,
      ...(u.unionField.hidden ? {} : { union_control_type: u.unionType.value }) };
  }

  /** The units of an infotext's `ControlNet N: "Field: value, ..."` entries, in unit order. */
  function fromInfotext(text) {
    const units = [];
    for (const m of String(text).matchAll(/ControlNet (\d+): "([^"]*)"/g)) {
      const u = { unit: Number(m[1]), enabled: true };
      for (const part of m[2].split(', ')) {
        const at = part.indexOf(': ');
        if (at < 0) continue;
        const key = part.slice(0, at).trim().toLowerCase().replace(/ /g, '_');
        const raw = part.slice(at + 2).trim();
        u[key] = raw === 'True' ? true : raw === 'False' ? false : (raw !== '' && !Number.isNaN(Number(raw)) ? Number(raw) : raw);
      }
      units.push(u);
    }
    return units.sort((a, b) => a.unit - b.unit);
  }

  function findModel(v) {
    if (v === undefined || v === null) return null;
    const s = String(v);
    const bare = s.replace(/\s*\[[0-9a-fA-F]+\]$/, '');
    const m = C.models.find((x) => x.path === s || x.title === s || x.name === s) || C.models.find((x) => x.name === bare);
    return m ? m.title : null;
  }

  function applyUnit(u, s, notes, restoring) {
    const has = (k) => s[k] !== undefined && s[k] !== null;
    // a reload keeps no control image: its units start off rather than fail the next Generate
    u.enabled.checked = restoring ? u.enabled.checked && Boolean(imageOf(u)) : s.enabled !== false;
    if (has('module')) {
      const m = C.modules.find((x) => x.name === s.module || x.label === s.module);
      if (m && m.available) u.module.value = m.name;
      else if (C.modules.length) notes.push(`ControlNet preprocessor ${s.module} ${m ? 'unavailable' : 'not found'}`);
    }
    if (has('model')) {
      const title = findModel(s.model);
      if (title) u.model.value = title;
      else if (!/^none$/i.test(String(s.model)) && C.models.length) notes.push(`ControlNet model ${s.model} not found`);
      else if (/^none$/i.test(String(s.model))) u.model.value = '';
      syncUnion(u);
    }
    if (has('union_control_type') && !u.unionField.hidden) {
      const t = String(s.union_control_type);
      if ([...u.unionType.options].some((o) => o.value === t)) u.unionType.value = t;
    }
    const num = (slot, k) => { if (has(k)) { slot.range.value = String(s[k]); slot.num.value = String(s[k]); } };
    num(u.weight, 'weight');
    num(u.start, 'guidance_start');
    num(u.end, 'guidance_end');
    if (CONTROL_MODES.includes(s.control_mode)) u.controlMode.value = s.control_mode;
    if (RESIZE_MODES.includes(s.resize_mode)) u.resizeMode.value = s.resize_mode;
    if (HR_OPTIONS.includes(s.hr_option)) u.hrOption.value = s.hr_option;
    if (has('pixel_perfect')) u.pixelPerfect.checked = Boolean(s.pixel_perfect);
    buildSliders(u, s);
  }

  DR.formExtensions.push({
    read(req, { submit }) {
      if (!submit) { req.controlnet = C.units.map(settingsOf); return; } // remembered without the images
      const on = C.units.filter((u) => u.enabled.checked);
      if (!on.length) return;
      req.controlnet = on.map((u) => {
        const image = imageOf(u);
        const free = C.modules.some((m) => m.name === u.module.value && m.model_free); // reference_*: no model
        if (!u.model.value && !free) throw new Error(`ControlNet unit ${u.i + 1}: pick a model (or turn the unit off)`);
        if (!image && !(DR.isImg2img && DR.isImg2img())) {
          throw new Error(`ControlNet unit ${u.i + 1}: choose or draw a control image (or turn the unit off)`);
        }
        if (!u.more.length) return { ...settingsOf(u), enabled: true, image, prepared: Boolean(u.prepared && image) };
        if (!image) throw new Error(`ControlNet unit ${u.i + 1}: its more pictures need a control image too`);
        const more = u.moreMode.value === 'batch' ? { batch_images: [image, ...u.more] } : { merge_images: [...u.more] };
        return { ...settingsOf(u), enabled: true, image, prepared: false, ...more }; // the extra pictures are photos
      });
    },
    apply(req, notes, { restoring } = {}) {
      let list = null;
      if (typeof req.infotext === 'string') list = fromInfotext(req.infotext);
      if ((!list || !list.length) && Array.isArray(req.controlnet)) list = req.controlnet;
      if (!list) return;
      list = list.filter((s) => s && typeof s === 'object');
      C.units.forEach((u, k) => {
        if (k < list.length) applyUnit(u, list[k], notes, restoring);
        else if (!restoring) u.enabled.checked = false; // settings of a picture made without this unit
      });
      if (list.length > UNITS) notes.push(`only ${UNITS} ControlNet units here (the picture had ${list.length})`);
      if (!restoring && C.units.some((u) => u.enabled.checked && !imageOf(u))) {
        notes.push(`${NO_IMAGES}: choose or draw them again`);
        if (typeof req.result_url === 'string') restoreMaps(req.result_url, list.map((s, k) => (Number.isInteger(s.unit) ? s.unit : k)));
      }
      if (!restoring && list.some((s) => s.enabled !== false)) C.section.open = true;
      render();
    },
  });
  DR.loaders.push(load);

  build();
  Object.assign(DR, { useAsControl, controlnet: { units: () => C.units.map(settingsOf), fromInfotext, load } });
})();
