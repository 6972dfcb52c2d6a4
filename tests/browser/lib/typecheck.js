// Holds clients/js/dolores.d.ts against clients/js/dolores.js with the TypeScript
// compiler API: both files in one program (dolores.js checked through its `// @ts-check`
// JSDoc), then export by export and member by member, in both directions. test/types.test.js
// runs it on the real files, and on altered copies to show that it catches a drift.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import ts from "typescript";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const jsFile = path.join(repoRoot, "clients/js/dolores.js");
export const dtsFile = path.join(repoRoot, "clients/js/dolores.d.ts");

/** Types dolores.js declares for itself that are not part of what an app imports. */
export const INTERNAL_TYPES = new Set(["Outcome", "EventName", "Saved", "JsonArray"]);

/** Source files parsed so far, by path (the real ones: altered copies are never kept). */
const parsed = new Map();

const OPTIONS = {
  allowJs: true,
  checkJs: true,
  noEmit: true,
  strict: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.ESNext,
  moduleResolution: ts.ModuleResolutionKind.Bundler,
  lib: ["lib.es2022.d.ts", "lib.dom.d.ts", "lib.dom.iterable.d.ts"],
  types: [],
};

/**
 * The differences between the two files' public surfaces, as sentences; empty when they
 * match. `texts` may replace either file's text ({js, dts}), for the tests of this check.
 */
export function compareTypes(texts = {}) {
  const host = ts.createCompilerHost(OPTIONS);
  const replaced = new Map([[jsFile, texts.js], [dtsFile, texts.dts]].filter(([, text]) => text !== undefined));
  const readFile = host.readFile.bind(host);
  host.readFile = (file) => (replaced.has(path.resolve(file)) ? replaced.get(path.resolve(file)) : readFile(file));
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (file, language, onError) => {
    const resolved = path.resolve(file);
    if (replaced.has(resolved)) return ts.createSourceFile(file, replaced.get(resolved), language, true);
    // The lib files are parsed once for all comparisons (they never change).
    if (!parsed.has(resolved)) parsed.set(resolved, getSourceFile(file, language, onError));
    return parsed.get(resolved);
  };
  const program = ts.createProgram([jsFile, dtsFile], OPTIONS, host);
  const checker = program.getTypeChecker();
  const problems = [];
  const moduleOf = (file) => {
    const source = program.getSourceFile(file);
    const symbol = source && checker.getSymbolAtLocation(source);
    if (!symbol) throw new Error(`${path.basename(file)} is not a module to TypeScript`);
    return new Map(checker.getExportsOfModule(symbol).map((s) => [s.name, s]));
  };
  const js = moduleOf(jsFile);
  const dts = moduleOf(dtsFile);
  const isValue = (s) => (s.flags & ts.SymbolFlags.Value) !== 0;
  const show = (t) => checker.typeToString(t, undefined, ts.TypeFormatFlags.NoTruncation);
  // For two object types: which properties are on one side only or typed differently.
  const memberDiff = (a, b) => {
    if (a.isUnion() || b.isUnion()) return "";
    const pa = new Map(checker.getPropertiesOfType(a).map((p) => [p.name, p]));
    const pb = new Map(checker.getPropertiesOfType(b).map((p) => [p.name, p]));
    const out = [];
    for (const n of pa.keys()) if (!pb.has(n)) out.push(`${n} only in dolores.js`);
    for (const n of pb.keys()) if (!pa.has(n)) out.push(`${n} only in dolores.d.ts`);
    for (const [n, p] of pa) {
      const q = pb.get(n);
      if (!q) continue;
      const [ta, tb] = [checker.getTypeOfSymbol(p), checker.getTypeOfSymbol(q)];
      if (!same(ta, tb)) out.push(`${n}: dolores.js ${show(ta)}, dolores.d.ts ${show(tb)}`);
    }
    return out.join("; ");
  };
  // A named type written out one level (its members, its union), not just its name.
  const expand = (t) => checker.typeToString(t, undefined, ts.TypeFormatFlags.NoTruncation | ts.TypeFormatFlags.InTypeAlias);
  // Assignable both ways, and — for object types — the same property names (an optional
  // property more on one side is assignable both ways, yet a drift).
  const names = (t) => checker.getPropertiesOfType(t).map((p) => p.name).sort().join(",");
  const same = (a, b) => checker.isTypeAssignableTo(a, b) && checker.isTypeAssignableTo(b, a)
    && (a.isUnion() || b.isUnion() || names(a) === names(b));

  for (const [name, symbol] of dts) {
    const other = js.get(name);
    if (!other) {
      problems.push(`dolores.d.ts exports ${name}, dolores.js does not`);
    } else if (isValue(symbol) !== isValue(other)) {
      problems.push(`${name} is a ${isValue(symbol) ? "value" : "type"} in dolores.d.ts, a ${isValue(other) ? "value" : "type"} in dolores.js`);
    } else if (!isValue(symbol)) {
      const [a, b] = [checker.getDeclaredTypeOfSymbol(other), checker.getDeclaredTypeOfSymbol(symbol)];
      if (!same(a, b)) problems.push(`type ${name} differs: ${memberDiff(a, b) || `dolores.js ${expand(a)}, dolores.d.ts ${expand(b)}`}`);
    }
  }
  for (const [name, symbol] of js) {
    if (dts.has(name)) continue;
    if (isValue(symbol)) problems.push(`dolores.js exports ${name}, dolores.d.ts does not`);
    else if (!INTERNAL_TYPES.has(name)) {
      problems.push(`dolores.js declares type ${name}, dolores.d.ts does not (add it there, or to INTERNAL_TYPES in lib/typecheck.js)`);
    }
  }

  for (const [name, symbol] of dts) {
    const other = js.get(name);
    if (!other || !(symbol.flags & ts.SymbolFlags.Class) || !(other.flags & ts.SymbolFlags.Class)) continue;
    compareClass(name, other, symbol);
  }
  return problems;

  function compareClass(name, jsClass, dtsClass) {
    const sides = [
      ["instance", (s) => checker.getDeclaredTypeOfSymbol(s)],
      ["static", (s) => checker.getTypeOfSymbol(s)],
    ];
    for (const [side, typeOf] of sides) {
      const members = (s) => new Map(checker.getPropertiesOfType(typeOf(s))
        .filter((m) => isPublic(m) && m.name !== "prototype")
        .map((m) => [m.name, m]));
      const a = members(jsClass);
      const b = members(dtsClass);
      for (const m of a.keys()) if (!b.has(m)) problems.push(`${name}: ${side} member ${m} is in dolores.js, not in dolores.d.ts`);
      for (const m of b.keys()) if (!a.has(m)) problems.push(`${name}: ${side} member ${m} is in dolores.d.ts, not in dolores.js`);
      for (const [m, ma] of a) {
        const mb = b.get(m);
        if (mb) compareMember(`${name}${side === "static" ? "." : "#"}${m}`, ma, mb);
      }
    }
    compareSignatures(`new ${name}`,
      checker.getSignaturesOfType(checker.getTypeOfSymbol(jsClass), ts.SignatureKind.Construct),
      checker.getSignaturesOfType(checker.getTypeOfSymbol(dtsClass), ts.SignatureKind.Construct),
      { returns: false });
  }

  function compareMember(what, a, b) {
    if (isReadonly(a) !== isReadonly(b)) {
      problems.push(`${what} is ${isReadonly(a) ? "" : "not "}read-only in dolores.js, ${isReadonly(b) ? "" : "not "}in dolores.d.ts`);
    }
    const [ta, tb] = [checker.getTypeOfSymbol(a), checker.getTypeOfSymbol(b)];
    const [ca, cb] = [ta.getCallSignatures(), tb.getCallSignatures()];
    if (ca.length || cb.length) compareSignatures(what, ca, cb, { returns: true });
    else if (!same(ta, tb)) problems.push(`${what}: dolores.js ${show(ta)}, dolores.d.ts ${show(tb)}`);
  }

  /** Overload by overload, in order: the same parameters (type and optionality) and
   * the same return type. */
  function compareSignatures(what, a, b, { returns }) {
    if (a.length !== b.length) {
      problems.push(`${what}: ${a.length} signature(s) in dolores.js, ${b.length} in dolores.d.ts`);
      return;
    }
    a.forEach((sa, i) => {
      const sb = b[i];
      const label = a.length > 1 ? `${what} (overload ${i + 1})` : what;
      const [pa, pb] = [sa.getParameters(), sb.getParameters()];
      if (pa.length !== pb.length) {
        problems.push(`${label}: ${pa.length} parameter(s) in dolores.js, ${pb.length} in dolores.d.ts`);
        return;
      }
      pa.forEach((p, j) => {
        const q = pb[j];
        // Optionality is compared below; a parameter with a default value has no
        // `undefined` in its type inside the function, so it is left out on both sides.
        const [ta, tb] = [checker.getTypeOfSymbol(p), checker.getTypeOfSymbol(q)];
        if (!same(checker.getNonNullableType(ta), checker.getNonNullableType(tb)) || hasNull(ta) !== hasNull(tb)) problems.push(`${label}, parameter ${j + 1} (${p.name}): dolores.js ${show(ta)}, dolores.d.ts ${show(tb)}`);
        if (isOptional(p) !== isOptional(q)) {
          problems.push(`${label}, parameter ${j + 1} (${p.name}) is ${isOptional(p) ? "optional" : "required"} in dolores.js, ${isOptional(q) ? "optional" : "required"} in dolores.d.ts`);
        }
      });
      if (returns) {
        const [ra, rb] = [sa.getReturnType(), sb.getReturnType()];
        if (!same(ra, rb)) problems.push(`${label} returns ${show(ra)} in dolores.js, ${show(rb)} in dolores.d.ts`);
      }
    });
  }

  function isOptional(parameter) {
    const declaration = parameter.valueDeclaration;
    return Boolean(declaration && ts.isParameter(declaration) && checker.isOptionalParameter(declaration));
  }
}

function hasNull(type) {
  return (type.isUnion() ? type.types : [type]).some((t) => (t.flags & ts.TypeFlags.Null) !== 0);
}

/** Not `#private`, not `private`/`protected`. */
function isPublic(symbol) {
  return (symbol.declarations || []).every((d) => {
    if (d.name && ts.isPrivateIdentifier(d.name)) return false;
    const flags = ts.getCombinedModifierFlags(d);
    return !(flags & (ts.ModifierFlags.Private | ts.ModifierFlags.Protected));
  }) && !symbol.name.startsWith("__#");
}

function isReadonly(symbol) {
  const declarations = symbol.declarations || [];
  if (declarations.some(ts.isGetAccessorDeclaration) && !declarations.some(ts.isSetAccessorDeclaration)) return true;
  return declarations.some((d) => (ts.getCombinedModifierFlags(d) & ts.ModifierFlags.Readonly) !== 0);
}

/** The text of the real files, for making altered copies. */
export const sources = () => ({ js: readFileSync(jsFile, "utf8"), dts: readFileSync(dtsFile, "utf8") });
