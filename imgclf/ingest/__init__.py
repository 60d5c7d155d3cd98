"""The ingest stage: a class tree or a Dataturks export -> a validated, canonical image set.

    collect (tree | Dataturks + downloads) -> validate (decode every distinct file once)
      -> de-duplicate -> name -> check usable -> write (images, manifest, reports)

One module a step: `collect`, `build` (validate, de-duplicate, name, check usable),
`outputs` (write, and the summary and failure message the stage prints) and `run`
(`run_ingest`, the stage's work); `records` holds what they pass on (`IngestOptions`,
`Candidate`, `Skip`, `IngestedImage`, `Collected`, `IngestResult`).

Nothing is ever dropped silently: every item that does not end up in data/images is one row of
metrics/ingest_skipped.csv with a reason code:
  - from images.inspect_image: not_an_image, unsupported_format, corrupt, truncated,
    empty_file, too_large (decompression bomb), unreadable;
  - from the source: ignored (hidden files and OS litter), link_outside (a symbolic link out
    of the source tree: never opened), broken_link, special_file (a FIFO, socket or device:
    never opened), unreadable (a file or folder this user cannot read: one row per folder),
    linked_class (a class folder linking to another class folder),
    missing_file, download_failed, unlabelled, skipped (by the annotator), bad_item,
    bad_label, bad_line (a malformed export line), multiple_labels, local_file_refused (a
    file of this machine named by an export that was downloaded);
  - duplicate: same bytes twice in one class; the copy with the smallest name is kept;
  - cross_class_duplicate: same bytes under several classes; dropped from all of them unless
    ingest.cross_class_duplicates is "keep" (then kept once in each).

A class folder (or label) left without any usable image is not a class: it is listed in
`stats["empty_classes"]`, not failed on. Images found in sub-folders of a class folder are
counted per class (`stats["from_subfolders"]`). `items` = images + skipped, always.

Output names are the original base names made safe (labels.safe_file_name); when different
files of one class would get the same name (ignoring case), each of them gets "_<sha256[:10]>"
before its extension, so the result does not depend on the order of the input.

`origin` (manifest and skip report) is where an item came from, as the user gave it: the
path relative to the class tree, or the Dataturks `content` (URL or path). No absolute paths,
so that the outputs are identical on every machine and in `dvc exp run --temp` copies.
"""
