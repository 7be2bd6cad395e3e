"""Patient matching: the pure core of the enterprise patient index (issue 4).

Plain functions over frozen values; no SQL, no Twisted, no I/O except the
nickname table read once from package data. The database side (tables,
wiring into the writer, reviews API and CLI) is built on top and calls
what follows.

Modules
-------
``features``  ``features_of(record) -> Features``: a facility record dict
              (shaped like ``MemoryState.records`` entries) normalised once;
              ``blocking_keys(features) -> frozenset[str]``: its index keys;
              ``encode_features`` / ``decode_features``: compact JSON to store;
              ``KEY_FIELDS``: which compared fields each kind of key fixes.
``compare``   ``compare(a, b) -> tuple[Level, ...]``: one agreement level per
              field of ``FIELDS`` (names, birth date, SSN, address, place,
              phone, sex, suffix, middle name); missing values are MISSING.
``model``     ``Model`` (m/u per field and level, thresholds, term-frequency
              tables; ``to_json``/``from_json``); ``default_model()``;
              ``score(a, b, model) -> Score`` (total bits, per-field level
              and weight, rules applied; ``Score.explain()`` for a
              technician); ``term_frequencies``, ``estimate_u``,
              ``estimate``, ``estimate_by_sessions`` (EM, no labels).
``decide``    ``decide(record, candidates, model, not_a_match=, manual=) ->
              Decision`` with action LINK / KEEP / REVIEW / NEW.

What the wiring must call, per new or changed facility record
----------------------------------------------------------------
In the message's transaction (A01/A04/A05/A28, A08/A31, and the survivor
after A40/A47):

1. ``f = features_of(record)``; ``keys = blocking_keys(f)``.
2. Candidates: the active records sharing any key (an indexed
   ``(key) -> (facility, mrn)`` table; a key whose posting list is very
   long, say over 500 rows, may be skipped as a stop key: the other keys
   cover it), plus every other record of those records' persons and of the
   record's own person (so the same-facility and sticky rules see whole
   persons). Each as ``Record(facility, mrn, person, features)``.
3. Sticky facts: ``not_a_match`` = keys (facility, mrn) of records a
   technician said are not this one, or that an A37 unlinked from it;
   ``manual`` = this record's current link was made or confirmed by a
   technician, or asserted by its facility (A24).
4. ``d = decide(Record(facility, mrn, current_person, f), candidates, model,
   not_a_match=..., manual=...)``, then apply it:

   - LINK: link the record to ``d.person`` (kind "auto", score ``d.score``);
     if ``d.duplicates``, also open a same-facility review for them.
   - KEEP: leave the link as it is.
   - REVIEW: open a review of the record with ``d.matches`` (each has the
     candidate's key, person and ``score.explain()``), ``d.reasons`` and the
     model's thresholds; ``d.person`` is the suggestion. A record that had
     no person gets a new one until the review is decided.
   - NEW: create a person for the record.

5. Replace the record's rows in the key table with ``keys`` and store
   ``encode_features(f)`` with the record (candidates are read back with
   ``decode_features``; on ValueError recompute with ``features_of``).

What the wiring must store
--------------------------
- the key table ``(key, facility, mrn)`` indexed on key; keys are short
  codes and digits (``dob:19500304``, ``fg:HANSAN:LAS``, ``ssn:...``);
- per record: its encoded features and its person link (kind auto / manual
  / source, score, when);
- the sticky facts: not-a-match pairs of record keys, manual and
  source-asserted links, with who, when and why;
- reviews: the records, each field's level and weight (``Score.explain()``),
  total, thresholds, reasons and state;
- the model: ``Model.to_json()`` in a versioned row, loaded once and cached
  (reload when a new version is stored). Until EM has run, use
  ``default_model()`` plus ``term_frequencies`` of the index.

Re-estimating the model (a scheduled job, off the hot path): ``tf, floor =
term_frequencies(all features)``; ``u = estimate_u(sample_random_pairs(...))``;
for a few kinds of key (``dob``, ``fg``, ``ssn``) count the comparison
vectors of pairs sharing a key of that kind (``level_counts``) and call
``estimate_by_sessions([(KEY_FIELDS[kind], counts), ...], start, u=u)`` with
``start = default_model().replace(tf=tf, tf_floor=floor)``. Thresholds are
kept from ``start``; ``bench/matching_offline.py`` shows the figures.

Costs (this machine): ``features_of`` ~20 µs, ``score`` ~12 µs a candidate,
``decide`` ~15 µs plus one score per candidate. Nothing here logs: the
values are PHI.
"""
