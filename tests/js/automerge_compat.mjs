// Loads every NAME.automerge in DIR (written by `cargo run -p crdt-schema --example
// js_fixtures -- DIR`) with the JavaScript Automerge library and checks that each field
// holds what a JavaScript user would expect for the value mesh reads (NAME.json): a
// counter as an Automerge Counter, a timestamp as a Date, a decimal as its exact text.
// Usage: node tests/js/automerge_compat.mjs DIR
import * as A from "@automerge/automerge";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";

const dir = process.argv[2];
if (!dir) {
  console.error("usage: node automerge_compat.mjs DIR");
  process.exit(2);
}

function expectField(doc, name, want) {
  const have = doc[name];
  if (typeof want === "string") {
    // mesh's short strings are Automerge scalar strings, which Automerge 3 for JavaScript
    // gives as ImmutableString (its plain strings are collaborative text).
    assert.ok(A.isImmutableString(have), `field ${name} is an ImmutableString`);
    assert.equal(have.toString(), want, `string ${name}`);
    return;
  }
  if (Array.isArray(want)) {
    assert.deepEqual(have.map(String), want, `list ${name}`);
    return;
  }
  if (want === null || typeof want !== "object") {
    assert.deepEqual(have, want, `field ${name}`);
    return;
  }
  const [tag, value] = Object.entries(want)[0];
  switch (tag) {
    case "$counter":
      assert.ok(have instanceof A.Counter, `field ${name} is an Automerge Counter`);
      assert.equal(have.value, value, `counter ${name}`);
      break;
    case "$timestamp":
      assert.ok(have instanceof Date, `field ${name} is a Date`);
      assert.equal(have.getTime(), value, `timestamp ${name}`);
      break;
    case "$text":
      assert.equal(String(have), value, `text ${name}`);
      break;
    case "$ref":
      assert.equal(String(have.$ref), value, `reference ${name}`);
      break;
    case "$decimal":
      // A decimal is its exact text in a map, never a float.
      assert.deepEqual(Object.keys(have), ["$decimal"], `decimal ${name} is one tagged map`);
      assert.equal(String(have.$decimal), value, `decimal ${name}`);
      break;
    default:
      throw new Error(`the fixture has a value tagged ${tag} that this test does not know`);
  }
}

let checked = 0;
for (const file of readdirSync(dir).filter((name) => name.endsWith(".automerge")).sort()) {
  const name = file.slice(0, -".automerge".length);
  const doc = A.load(new Uint8Array(readFileSync(join(dir, file))));
  const want = JSON.parse(readFileSync(join(dir, `${name}.json`), "utf8"));
  assert.deepEqual([...A.getHeads(doc)].sort(), [...want.heads].sort(), `${name}: heads`);
  const userFields = Object.keys(doc).filter((key) => !key.startsWith("_")).sort();
  assert.deepEqual(userFields, Object.keys(want.fields).sort(), `${name}: field names`);
  for (const [field, value] of Object.entries(want.fields)) {
    expectField(doc, field, value);
  }
  console.log(`${name}: ${userFields.length} fields load in JavaScript Automerge as mesh reads them`);
  checked += 1;
}
if (checked === 0) {
  console.error(`no fixtures in ${dir}`);
  process.exit(1);
}
