/* Darkroom browser UI — a short explanation for each generation setting: a "?" button after the
 * control's label toggles a description in the page, tied to the control with aria-describedby.
 * Plain text, no links out. Labels that wrap their control become <label for> so the button and
 * the description are not part of the control's name.
 */
'use strict';

(() => {
  const DR = (window.Darkroom = window.Darkroom || {});
  const $ = (id) => document.getElementById(id);

  const HELP = {
    cfg: 'How strictly the image follows the prompt. 5–9 suits most models; higher gets harsh and oversaturated, '
      + 'lower gets loose and washed out. Few-step models (LCM, Turbo) want 1–2.',
    sampler: 'The method that turns noise into an image step by step. "Euler a" and "DPM++ 2M" are good defaults; '
      + 'ancestral samplers (with "a" or "SDE") keep changing the picture as steps grow.',
    schedule: 'How the noise level falls over the steps. "Automatic" takes the sampler\'s usual one; Karras spends '
      + 'more steps on fine detail.',
    steps: 'How many denoising steps to run. 20–30 is typical; more costs time and rarely helps past 40.',
    seed: 'The starting noise. The same seed with the same settings gives the same image; -1 picks a random one.',
    subseed: 'A second seed whose noise is blended into the first: small changes of one image while keeping its layout.',
    'subseed-strength': 'How much of the variation seed\'s noise to blend in: 0 is none, 1 is the variation seed alone.',
    denoise: 'How much the image is redrawn: 0 keeps it as it is, 1 ignores it. 0.3–0.6 changes details and keeps the composition.',
    'hr-scale': 'Hires fix draws at the normal size, then enlarges by this factor and redraws the details; '
      + 'it avoids the doubled heads of drawing large at once.',
    'hr-upscaler': 'How the first image is enlarged before the second pass. Latent works in the model\'s space and '
      + 'needs a denoising strength of about 0.5 or more; Lanczos keeps more of the first image.',
    'hr-steps': 'Steps of the second (hires) pass; 0 uses the same number as the first.',
    'masked-content': 'What the masked area starts from: the original image (small changes), a flat fill of its '
      + 'colours, or latent noise / nothing (new content; use a high denoising strength).',
    'mask-blur': 'How many pixels the mask\'s edge is softened, so the repainted area blends in.',
    'only-masked': 'Redraw only a crop around the mask at full resolution and paste it back: more detail for small areas.',
    'only-masked-padding': 'Pixels of context kept around the mask when only the masked area is redrawn.',
    'resize-mode': 'How a source image of another shape is fitted: stretched, cropped to fill, or padded with its edge colours.',
    'clip-skip': 'Use the text encoder\'s output this many layers from the end. 2 suits many anime models; 1 is the normal.',
    eta: 'Extra noise added by ancestral and DDIM samplers at each step; empty keeps the sampler\'s default.',
    ensd: 'Eta noise seed delta: an offset added to the seed of the sampler\'s extra noise (31337 matches some shared images).',
    rng: 'Where the starting noise comes from. CPU gives the same image on any machine; GPU and NV match images made '
      + 'with the webui on an NVIDIA card.',
    tiling: 'Make the image wrap around at its edges, so it tiles as a seamless texture.',
    'token-merging': 'Token merging (ToMe): merge this share of the most alike parts of the image inside the model\'s '
      + 'largest attention layers. 0.3–0.5 makes SD 1.5 steps faster on a CPU and changes the picture a little; '
      + 'it does nothing for SDXL or the built-in starter model. 0 is off (or the token_merging_ratio setting).',
    'styles-search': 'Styles are saved prompt snippets (the webui\'s styles.csv). A checked style adds its text to '
      + 'the prompt and the negative prompt when the job runs.',
    'batch-count': 'How many batches to run one after another. Each adds time, not memory.',
    'batch-size': 'How many images to draw at once in one batch. Faster per image, but needs more memory.',
  };

  const NAMES = { 'styles-search': 'Styles' }; // where the label's text is not the setting's name
  let n = 0;
  /** A labelled field as <div class="field"><div class="label-row"><label for>…</label></div>control</div>. */
  function fieldParts(control) {
    const wrap = control.closest('label');
    if (wrap && wrap.classList.contains('field')) {
      const div = DR.el('div', { className: wrap.className });
      div.append(...wrap.childNodes);
      wrap.replaceWith(div);
      const span = div.querySelector(':scope > .label');
      const label = DR.el('label', { className: 'label', htmlFor: control.id });
      label.append(...span.childNodes);
      span.replaceWith(label);
      return { box: div, after: label };
    }
    if (wrap && wrap.classList.contains('check')) { // a checkbox: the button and text go after its label
      const div = DR.el('div', { className: 'help-check' + (wrap.classList.contains('field-wide') ? ' field-wide' : '') });
      wrap.replaceWith(div);
      wrap.classList.remove('field-wide');
      div.append(wrap);
      return { box: div, after: wrap };
    }
    const label = document.querySelector(`label[for="${control.id}"]`);
    if (label) return { box: label.parentElement, after: label };
    return { box: control.parentElement.parentElement, after: control.parentElement }; // e.g. the styles filter bar
  }

  function addHelp(id, text) {
    const control = $(id);
    if (!control) return;
    const { box, after } = fieldParts(control);
    const helpId = `help-${id}`;
    const name = NAMES[id] || (after.textContent || id).replace(/\s*\(.*\)\s*$/, '').trim() || id;
    const p = DR.el('p', { className: 'help-text', id: helpId, textContent: text, hidden: true });
    const btn = DR.el('button', { type: 'button', className: 'help-btn', textContent: '?', title: `What is ${name}?` });
    btn.setAttribute('aria-label', `Help: ${name}`);
    btn.setAttribute('aria-expanded', 'false');
    btn.setAttribute('aria-controls', helpId);
    btn.addEventListener('click', () => {
      p.hidden = !p.hidden;
      btn.setAttribute('aria-expanded', String(!p.hidden));
    });
    if (after.classList.contains('label')) {
      const row = DR.el('div', { className: 'label-row' });
      after.replaceWith(row);
      row.append(after, btn);
    } else {
      after.after(btn);
    }
    box.append(p);
    const described = (control.getAttribute('aria-describedby') || '').split(/\s+/).filter(Boolean);
    control.setAttribute('aria-describedby', [...described, helpId].join(' '));
    n += 1;
  }

  document.addEventListener('DOMContentLoaded', () => {
    for (const [id, text] of Object.entries(HELP)) addHelp(id, text);
  });
  DR.helpCount = () => n;
})();
