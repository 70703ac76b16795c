/* Darkroom browser UI — the first-run welcome.
 *
 * Shown on the Generate page while the only checkpoint is the built-in starter (a 128-pixel demo
 * that draws coloured shapes), until dismissed (remembered in localStorage). It says what the
 * starter is, offers prompts it draws well as one-click chips, and shows how to add real
 * checkpoints (models.js's import and use-in-place forms). Loaded (defer) after models.js.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el } = DR;
  const KEY = 'darkroom.welcome.dismissed';
  const STARTER_PROMPTS = [ // docs/starter-notes.md: one or two shapes, a colour each, a place, a background
    'a red circle on a white background',
    'a green triangle at the bottom',
    'a blue square in the top left',
    'a yellow star on a black background',
    'a red circle above a blue square',
    'a purple heart on the right',
  ];
  const STARTER_PLACEHOLDER = STARTER_PROMPTS[0];
  let decided = false;
  let placeholder = null; // the form's own placeholder, put back for real models

  const dismissed = () => { try { return localStorage.getItem(KEY) === '1'; } catch (e) { return false; } };

  function dismiss() {
    try { localStorage.setItem(KEY, '1'); } catch (e) { /* storage off: hidden for this visit */ }
    $('welcome').hidden = true;
    $('prompt').focus({ preventScroll: true });
  }

  function useChip(text) {
    $('prompt').value = text;
    $('prompt').dispatchEvent(new Event('input', { bubbles: true })); // saved like typing
    const starter = (DR.state.models || []).find((m) => m.builtin && !m.error);
    const cur = DR.currentModelEntry();
    if (starter && (!cur || !cur.builtin)) { $('model').value = starter.name; DR.selectModel(starter.name); }
    $('prompt').focus({ preventScroll: true });
  }

  function build() {
    const chips = STARTER_PROMPTS.map((p) => {
      const b = el('button', { type: 'button', className: 'chip', textContent: p });
      b.addEventListener('click', () => useChip(p));
      return b;
    });
    const close = el('button', { type: 'button', className: 'btn btn-icon welcome-close', 'aria-label': 'Dismiss the welcome', textContent: '✕' });
    close.addEventListener('click', dismiss);
    const gotIt = el('button', { type: 'button', className: 'btn', id: 'welcome-dismiss', textContent: 'Got it, hide this' });
    gotIt.addEventListener('click', dismiss);
    const folder = el('p', { className: 'folder-line', id: 'welcome-folder' }, el('span', { className: 'muted' }, 'Loading the models folder…'));
    const add = el('div', { className: 'add-models', id: 'welcome-add' });
    $('welcome').replaceChildren(
      el('div', { className: 'welcome-head' }, el('h2', { id: 'welcome-title', textContent: 'Welcome to Darkroom' }), close),
      el('p', {}, 'The built-in model, ', el('strong', { textContent: 'darkroom-starter' }),
        ', is a tiny 128 × 128 demo trained only on coloured shapes (circles, squares, triangles, stars, rings,'
        + ' hearts, crosses in 12 colours). It cannot draw photos or people: a prompt like “a lighthouse at dusk”'
        + ' gives a dark blur. Try one of these:'),
      el('div', { className: 'chips', role: 'group', 'aria-label': 'Prompts the built-in model draws well' }, ...chips),
      el('h3', { className: 'sub-title', textContent: 'Add real checkpoints' }),
      el('p', {}, 'Copy .safetensors checkpoints (SD 1.5, SD 2.x, SDXL) into the models folder and press Rescan on the Models page, or import them here:'),
      folder, add,
      el('div', { className: 'actions' }, gotIt));
    DR.mountAddModels(add, 'welcome');
    DR.onLibrary((s) => {
      const copy = el('button', { type: 'button', className: 'btn btn-small', textContent: 'Copy path' });
      copy.addEventListener('click', () => DR.copyText(s.checkpoints_folder));
      folder.replaceChildren(el('span', { className: 'muted' }, 'Models folder: '),
        el('code', { className: 'folder-path', id: 'welcome-folder-path', textContent: s.checkpoints_folder }), ' ', copy);
    });
    DR.loadLibrary().catch(DR.showError);
  }

  /* Decide once, on the first model list: a later import must not pull the panel away mid-read. */
  function onModels(list) {
    const cur = DR.currentModelEntry();
    if (placeholder === null) placeholder = $('prompt').placeholder;
    $('prompt').placeholder = cur && cur.builtin ? STARTER_PLACEHOLDER : placeholder;
    if (decided || !list.length) return;
    decided = true;
    const onlyStarter = list.every((m) => m.builtin || m.error); // no checkpoint of the user's that works
    if (!onlyStarter || dismissed()) return;
    build();
    $('welcome').hidden = false;
  }
  DR.onModels.push(onModels);
  $('model').addEventListener('change', () => onModels(DR.state.models || []));
})();
