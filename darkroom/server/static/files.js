/* Darkroom browser UI — image files the user gives: read, check, and drop zones.
 * One copy for img2img, Extras and PNG info (loaded right after app.js).
 */
'use strict';

(() => {
  const DR = window.Darkroom;

  DR.readAsDataURL = (blob) => new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(new Error('could not read the file'));
    r.readAsDataURL(blob);
  });

  /** Whether a drag carries files (not a link or text). */
  DR.hasFiles = (e) => Boolean(e.dataTransfer) && [...(e.dataTransfer.types || [])].includes('Files');

  /** Read a PNG/JPEG/WebP file the user chose and hand it to `set(dataUrl, name)`; problems become toasts. */
  DR.loadImageFile = async (file, set) => {
    if (!file) return;
    if (file.type && !/^image\/(png|jpeg|webp)$/.test(file.type)) {
      DR.toast(`${file.name || 'That file'} is not a PNG, JPEG or WebP image`, 'error');
      return;
    }
    try {
      await set(await DR.readAsDataURL(file), file.name || 'image');
    } catch (e) {
      DR.showError(e);
    }
  };

  /** `drop` highlights while files are dragged over it and hands the first dropped file to `take`. */
  DR.fileDropZone = (drop, take) => {
    const hasFiles = DR.hasFiles;
    drop.addEventListener('dragenter', (e) => { if (hasFiles(e)) { e.preventDefault(); drop.classList.add('over'); } });
    drop.addEventListener('dragover', (e) => { if (hasFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; } });
    drop.addEventListener('dragleave', (e) => { if (!drop.contains(e.relatedTarget)) drop.classList.remove('over'); });
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      e.stopPropagation();
      drop.classList.remove('over');
      take(e.dataTransfer.files[0]);
    });
  };
})();
