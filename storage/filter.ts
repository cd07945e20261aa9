/**
 * Filters: small SQL-like predicates over a table's columns, e.g.
 * `country IN ('France', 'Spain') AND usd >= 100 AND eventTime < TIMESTAMP '2023-07-01 00:00:00'`.
 *
 * A filter is parsed once, checked against the table's schema (columns exist, literals fit
 * their types), then used twice: to skip row groups (and whole data files) whose statistics
 * exclude it, and to keep exactly the matching rows of what was read. SQL's three-valued logic
 * holds: a comparison with NULL is not true, so such rows are dropped.
 */
import { FilterSyntaxError, StorageError, UnknownColumnError } from './errors.ts';
import type { ColumnKind, ColumnStats, ColumnValue } from './columns.ts';

export type Literal =
  | { type: 'number'; value: number; text: string }
  | { type: 'string'; value: string }
  | { type: 'boolean'; value: boolean }
  | { type: 'temporal'; value: number; text: string };

export type ComparisonOp = '=' | '!=' | '<' | '<=' | '>' | '>=';

export type Filter =
  | { kind: 'and'; left: Filter; right: Filter }
  | { kind: 'or'; left: Filter; right: Filter }
  | { kind: 'not'; operand: Filter }
  | { kind: 'compare'; column: string; op: ComparisonOp; value: Literal }
  | { kind: 'between'; column: string; low: Literal; high: Literal; negated: boolean }
  | { kind: 'in'; column: string; values: Literal[]; negated: boolean }
  | { kind: 'null'; column: string; negated: boolean };

type Token =
  | { t: 'ident'; v: string; pos: number; quoted: boolean }
  | { t: 'number'; v: string; pos: number }
  | { t: 'string'; v: string; pos: number }
  | { t: 'op'; v: string; pos: number }
  | { t: 'end'; pos: number };

const KEYWORDS = new Set(['AND', 'OR', 'NOT', 'BETWEEN', 'IN', 'IS', 'NULL', 'TRUE', 'FALSE', 'DATE', 'TIMESTAMP']);

function tokenize(text: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (/\s/.test(c)) {
      i++;
      continue;
    }
    const start = i;
    if (/[A-Za-z_]/.test(c)) {
      while (i < text.length && /[A-Za-z0-9_]/.test(text[i]!)) i++;
      tokens.push({ t: 'ident', v: text.slice(start, i), pos: start, quoted: false });
    } else if (c === '"') {
      const end = text.indexOf('"', i + 1);
      if (end < 0) throw new FilterSyntaxError(text, start, 'a closing " for the quoted column name', 'the end of the filter');
      tokens.push({ t: 'ident', v: text.slice(i + 1, end), pos: start, quoted: true });
      i = end + 1;
    } else if (/[0-9]/.test(c) || (c === '-' && /[0-9.]/.test(text[i + 1] ?? '')) || (c === '.' && /[0-9]/.test(text[i + 1] ?? ''))) {
      const m = /^-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?/.exec(text.slice(i))!;
      i += m[0].length;
      tokens.push({ t: 'number', v: m[0], pos: start });
    } else if (c === "'") {
      let value = '';
      i++;
      for (;;) {
        if (i >= text.length) throw new FilterSyntaxError(text, start, "a closing ' for the string", 'the end of the filter');
        if (text[i] === "'") {
          if (text[i + 1] === "'") {
            value += "'";
            i += 2;
            continue;
          }
          i++;
          break;
        }
        value += text[i++];
      }
      tokens.push({ t: 'string', v: value, pos: start });
    } else {
      const two = text.slice(i, i + 2);
      if (['<=', '>=', '!=', '<>'].includes(two)) {
        tokens.push({ t: 'op', v: two === '<>' ? '!=' : two, pos: start });
        i += 2;
      } else if ('=<>(),'.includes(c)) {
        tokens.push({ t: 'op', v: c, pos: start });
        i++;
      } else {
        throw new FilterSyntaxError(text, start, 'a column, a literal, an operator or a parenthesis', JSON.stringify(c));
      }
    }
  }
  tokens.push({ t: 'end', pos: text.length });
  return tokens;
}

function describeToken(token: Token): string {
  if (token.t === 'end') return 'the end of the filter';
  if (token.t === 'string') return `'${token.v}'`;
  return token.t === 'ident' && KEYWORDS.has(token.v.toUpperCase()) && !token.quoted ? token.v.toUpperCase() : JSON.stringify(token.v);
}

/** Parses a filter. Throws {@link FilterSyntaxError} with the position and what was expected. */
export function parseFilter(text: string): Filter {
  const tokens = tokenize(text);
  let at = 0;
  const peek = () => tokens[at]!;
  const fail = (expected: string): never => {
    throw new FilterSyntaxError(text, peek().pos, expected, describeToken(peek()));
  };
  const isKeyword = (word: string, token = peek()) => token.t === 'ident' && !token.quoted && token.v.toUpperCase() === word;
  const isOp = (op: string) => peek().t === 'op' && (peek() as { v: string }).v === op;
  const expectKeyword = (word: string) => (isKeyword(word) ? at++ : fail(word));
  const expectOp = (op: string) => (isOp(op) ? at++ : fail(`"${op}"`));

  const literal = (): Literal => {
    const token = peek();
    if (token.t === 'number') {
      at++;
      return { type: 'number', value: Number(token.v), text: token.v };
    }
    if (token.t === 'string') {
      at++;
      return { type: 'string', value: token.v };
    }
    if (isKeyword('TRUE') || isKeyword('FALSE')) {
      at++;
      return { type: 'boolean', value: isKeyword('TRUE', token) };
    }
    if (isKeyword('DATE') || isKeyword('TIMESTAMP')) {
      const word = (token as { v: string }).v.toUpperCase();
      at++;
      const quoted = peek();
      if (quoted.t !== 'string') return fail(`a quoted ${word === 'DATE' ? "date like '2024-01-31'" : "timestamp like '2024-01-31 12:00:00'"} after ${word}`);
      at++;
      const ms = parseTemporal(quoted.v, word === 'DATE');
      if (ms === null) {
        throw new FilterSyntaxError(text, quoted.pos, word === 'DATE' ? "a date as 'YYYY-MM-DD'" : "a timestamp as 'YYYY-MM-DD[ HH:MM[:SS[.fff]]][Z|±HH:MM]'", `'${quoted.v}'`);
      }
      return { type: 'temporal', value: ms, text: `${word} '${quoted.v}'` };
    }
    return fail('a literal (a number, a quoted string, TRUE, FALSE, DATE or TIMESTAMP)');
  };

  const column = (): string => {
    const token = peek();
    if (token.t !== 'ident' || (!token.quoted && KEYWORDS.has(token.v.toUpperCase()))) return fail('a column name');
    at++;
    return token.v;
  };

  const predicate = (): Filter => {
    if (isOp('(')) {
      at++;
      const inner = or();
      expectOp(')');
      return inner;
    }
    const name = column();
    if (isKeyword('IS')) {
      at++;
      const negated = isKeyword('NOT') ? (at++, true) : false;
      expectKeyword('NULL');
      return { kind: 'null', column: name, negated };
    }
    const negated = isKeyword('NOT') ? (at++, true) : false;
    if (isKeyword('BETWEEN')) {
      at++;
      const low = literal();
      expectKeyword('AND');
      const high = literal();
      return { kind: 'between', column: name, low, high, negated };
    }
    if (isKeyword('IN')) {
      at++;
      expectOp('(');
      const values = [literal()];
      while (isOp(',')) {
        at++;
        values.push(literal());
      }
      expectOp(')');
      return { kind: 'in', column: name, values, negated };
    }
    if (negated) return fail('BETWEEN or IN after NOT');
    const token = peek();
    if (token.t === 'op' && ['=', '!=', '<', '<=', '>', '>='].includes(token.v)) {
      at++;
      if (isKeyword('NULL')) fail('a literal (use IS NULL or IS NOT NULL to test for NULL)');
      return { kind: 'compare', column: name, op: token.v as ComparisonOp, value: literal() };
    }
    return fail('a comparison (=, !=, <, <=, >, >=), BETWEEN, IN or IS [NOT] NULL');
  };

  const not = (): Filter => {
    if (isKeyword('NOT')) {
      at++;
      return { kind: 'not', operand: not() };
    }
    return predicate();
  };
  const and = (): Filter => {
    let left = not();
    while (isKeyword('AND')) {
      at++;
      left = { kind: 'and', left, right: not() };
    }
    return left;
  };
  const or = (): Filter => {
    let left = and();
    while (isKeyword('OR')) {
      at++;
      left = { kind: 'or', left, right: and() };
    }
    return left;
  };

  if (peek().t === 'end') fail('a predicate');
  const filter = or();
  if (peek().t !== 'end') fail('AND, OR or the end of the filter');
  return filter;
}

/** Epoch milliseconds of a date or timestamp literal (UTC unless it names an offset), or null. */
function parseTemporal(text: string, dateOnly: boolean): number | null {
  const m = dateOnly
    ? /^(\d{4})-(\d{2})-(\d{2})$/.exec(text)
    : /^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?)?(Z|[+-]\d{2}:\d{2})?$/.exec(text);
  if (!m) return null;
  const [, y, mo, d, h = '00', mi = '00', s = '00', frac = '', zone = 'Z'] = m;
  const iso = `${y}-${mo}-${d}T${h}:${mi}:${s}${frac ? frac.slice(0, 4).padEnd(4, '0') : '.000'}${zone}`;
  const ms = Date.parse(iso);
  if (Number.isNaN(ms)) return null;
  // Date.parse rolls 2024-02-30 over to March: refuse dates that do not exist.
  const back = new Date(ms - (zone === 'Z' ? 0 : offsetMs(zone)));
  if (back.getUTCFullYear() !== Number(y) || back.getUTCMonth() + 1 !== Number(mo) || back.getUTCDate() !== Number(d)) return null;
  return ms;
}

function offsetMs(zone: string): number {
  const sign = zone.startsWith('-') ? -1 : 1;
  const [hh, mm] = zone.slice(1).split(':').map(Number) as [number, number];
  return -sign * (hh * 60 + mm) * 60_000;
}

/** Every column a filter names, once each, in order of appearance. */
export function filterColumns(filter: Filter): string[] {
  const out: string[] = [];
  const visit = (f: Filter): void => {
    if (f.kind === 'and' || f.kind === 'or') {
      visit(f.left);
      visit(f.right);
    } else if (f.kind === 'not') visit(f.operand);
    else if (!out.includes(f.column)) out.push(f.column);
  };
  visit(filter);
  return out;
}

/**
 * Checks a filter against a table's columns: every column exists and every literal fits its
 * column's type. Throws {@link UnknownColumnError} (listing the columns) or an ERR_FILTER_TYPE error.
 */
export function validateFilter(filter: Filter, table: string, kinds: ReadonlyMap<string, ColumnKind>, filterText: string): void {
  const unknown = filterColumns(filter).filter((c) => !kinds.has(c));
  if (unknown.length > 0) throw new UnknownColumnError(table, unknown, [...kinds.keys()], `filter ${JSON.stringify(filterText)}`);
  const check = (column: string, literal: Literal): void => {
    const kind = kinds.get(column)!;
    const fits =
      ((kind === 'number' || kind === 'bigint') && literal.type === 'number') ||
      (kind === 'string' && literal.type === 'string') ||
      (kind === 'boolean' && literal.type === 'boolean') ||
      (kind === 'temporal' && literal.type === 'temporal');
    if (!fits) {
      const hint = kind === 'temporal' ? " (write DATE '2024-01-31' or TIMESTAMP '2024-01-31 12:00:00')" : '';
      throw new StorageError(
        'ERR_FILTER_TYPE',
        `filter ${JSON.stringify(filterText)}: column "${column}" holds ${kind === 'other' ? 'values filters cannot compare (only IS NULL works on it)' : `${kind} values`}, but is compared with ${describeLiteral(literal)}${hint}`,
      );
    }
    if (kind === 'bigint' && literal.type === 'number' && bigintOf(literal) === null) {
      throw new StorageError('ERR_FILTER_TYPE', `filter ${JSON.stringify(filterText)}: column "${column}" holds 64-bit integers, but is compared with ${describeLiteral(literal)}`);
    }
  };
  const visit = (f: Filter): void => {
    switch (f.kind) {
      case 'and':
      case 'or':
        visit(f.left);
        visit(f.right);
        return;
      case 'not':
        visit(f.operand);
        return;
      case 'compare':
        check(f.column, f.value);
        return;
      case 'between':
        check(f.column, f.low);
        check(f.column, f.high);
        return;
      case 'in':
        for (const v of f.values) check(f.column, v);
        return;
      case 'null':
        return;
    }
  };
  visit(filter);
}

function describeLiteral(literal: Literal): string {
  switch (literal.type) {
    case 'string':
      return `the string '${literal.value}'`;
    case 'number':
      return `the number ${literal.text}`;
    case 'boolean':
      return literal.value ? 'TRUE' : 'FALSE';
    case 'temporal':
      return literal.text;
  }
}

/**
 * Negations pushed down to the predicates (De Morgan; NOT a < b is a >= b). What is left has no
 * NOT, so treating "unknown" (NULL) as false anywhere gives the same rows as SQL does.
 */
type Positive = Exclude<Filter, { kind: 'not' }>;

const INVERSE: Record<ComparisonOp, ComparisonOp> = { '=': '!=', '!=': '=', '<': '>=', '<=': '>', '>': '<=', '>=': '<' };

function pushNegations(filter: Filter, negate = false): Positive {
  switch (filter.kind) {
    case 'not':
      return pushNegations(filter.operand, !negate);
    case 'and':
    case 'or': {
      const kind: 'and' | 'or' = negate ? (filter.kind === 'and' ? 'or' : 'and') : filter.kind;
      return { kind, left: pushNegations(filter.left, negate), right: pushNegations(filter.right, negate) };
    }
    case 'compare':
      return negate ? { ...filter, op: INVERSE[filter.op] } : filter;
    default:
      return negate ? { ...filter, negated: !filter.negated } : filter;
  }
}

/**
 * A number literal as an exact bigint, from its text: `9007199254740993` stays that, where the
 * double it parses to would be ...992. Null when it is not an integer.
 */
function bigintOf(literal: Extract<Literal, { type: 'number' }>): bigint | null {
  if (/^-?\d+$/.test(literal.text)) return BigInt(literal.text);
  // 1e3 and the like: integers written otherwise, exact as long as the double is.
  return Number.isInteger(literal.value) ? BigInt(literal.value) : null;
}

/** A literal as a value of its column's kind (numbers become exact bigints on 64-bit integer columns). */
function valueFor(literal: Literal, kind: ColumnKind): ColumnValue {
  if (kind === 'bigint' && literal.type === 'number') return bigintOf(literal) ?? BigInt(Math.trunc(literal.value));
  return literal.value;
}

/**
 * Strings in Unicode code point order, which is UTF-8 byte order: the order Parquet writes
 * min/max statistics in. JavaScript's `<` compares UTF-16 code units instead, which puts
 * characters above U+FFFF (surrogate pairs) before U+E000..U+FFFF and would skip row groups
 * that hold matches.
 */
export function compareStrings(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    const xSurrogate = x >= 0xd800 && x <= 0xdfff;
    const ySurrogate = y >= 0xd800 && y <= 0xdfff;
    // A surrogate starts a code point above U+FFFF: after every character of the BMP.
    if (xSurrogate !== ySurrogate) return xSurrogate ? 1 : -1;
    return x - y;
  }
  return a.length - b.length;
}

/** Orders two values of one column kind: strings by {@link compareStrings}, the rest by `<` (bigints exactly). */
export function compareValues(a: ColumnValue, b: ColumnValue): number {
  if (typeof a === 'string' && typeof b === 'string') return compareStrings(a, b);
  return a < b ? -1 : a > b ? 1 : 0;
}

type RowStats = (column: string) => (ColumnStats & { rows: number }) | undefined;

/**
 * False only when no row described by `stats` can match (so the row group or data file is
 * skipped); true when some might. Missing statistics never skip anything.
 */
export function mayMatch(filter: Filter, kinds: ReadonlyMap<string, ColumnKind>, stats: RowStats): boolean {
  return mayMatchPositive(pushNegations(filter), kinds, stats);
}

function mayMatchPositive(f: Positive, kinds: ReadonlyMap<string, ColumnKind>, stats: RowStats): boolean {
  if (f.kind === 'and') return mayMatchPositive(f.left as Positive, kinds, stats) && mayMatchPositive(f.right as Positive, kinds, stats);
  if (f.kind === 'or') return mayMatchPositive(f.left as Positive, kinds, stats) || mayMatchPositive(f.right as Positive, kinds, stats);
  const s = stats(f.column);
  if (!s) return true;
  const allNull = s.nullCount !== undefined && s.nullCount >= s.rows;
  if (f.kind === 'null') {
    if (s.nullCount === undefined) return true;
    return f.negated ? s.nullCount < s.rows : s.nullCount > 0;
  }
  if (allNull) return false;
  const { min, max } = s;
  if (min === undefined || max === undefined) return true;
  const kind = kinds.get(f.column)!;
  const c = compareValues;
  const inRange = (v: ColumnValue) => c(min, v) <= 0 && c(v, max) <= 0;
  switch (f.kind) {
    case 'compare': {
      const v = valueFor(f.value, kind);
      switch (f.op) {
        case '=':
          return inRange(v);
        case '!=':
          return !(min === v && max === v);
        case '<':
          return c(min, v) < 0;
        case '<=':
          return c(min, v) <= 0;
        case '>':
          return c(max, v) > 0;
        case '>=':
          return c(max, v) >= 0;
      }
      break;
    }
    case 'between': {
      const low = valueFor(f.low, kind);
      const high = valueFor(f.high, kind);
      return f.negated ? c(min, low) < 0 || c(max, high) > 0 : c(max, low) >= 0 && c(min, high) <= 0 && c(low, high) <= 0;
    }
    case 'in': {
      const values = f.values.map((v) => valueFor(v, kind));
      return f.negated ? !values.some((v) => min === v && max === v) : values.some(inRange);
    }
  }
  return true;
}

/** Reads the value of row `i` of a column (null for NULL), in the column's filter kind. */
export type ValueAt = (i: number) => ColumnValue | null;

/** Compiles the filter into a row test over the given column readers. */
export function compileFilter(filter: Filter, kinds: ReadonlyMap<string, ColumnKind>): (column: (name: string) => ValueAt) => (i: number) => boolean {
  const positive = pushNegations(filter);
  return (column) => build(positive, kinds, column);
}

function build(f: Positive, kinds: ReadonlyMap<string, ColumnKind>, column: (name: string) => ValueAt): (i: number) => boolean {
  if (f.kind === 'and' || f.kind === 'or') {
    const left = build(f.left as Positive, kinds, column);
    const right = build(f.right as Positive, kinds, column);
    return f.kind === 'and' ? (i) => left(i) && right(i) : (i) => left(i) || right(i);
  }
  const get = column(f.column);
  if (f.kind === 'null') return f.negated ? (i) => get(i) !== null : (i) => get(i) === null;
  const kind = kinds.get(f.column)!;
  switch (f.kind) {
    case 'compare': {
      const v = valueFor(f.value, kind);
      const test = COMPARE[f.op];
      return (i) => {
        const x = get(i);
        return x !== null && test(x, v);
      };
    }
    case 'between': {
      const low = valueFor(f.low, kind);
      const high = valueFor(f.high, kind);
      return f.negated
        ? (i) => {
            const x = get(i);
            return x !== null && (compareValues(x, low) < 0 || compareValues(x, high) > 0);
          }
        : (i) => {
            const x = get(i);
            return x !== null && compareValues(x, low) >= 0 && compareValues(x, high) <= 0;
          };
    }
    case 'in': {
      const values = new Set(f.values.map((v) => valueFor(v, kind)));
      return f.negated
        ? (i) => {
            const x = get(i);
            return x !== null && !values.has(x);
          }
        : (i) => {
            const x = get(i);
            return x !== null && values.has(x);
          };
    }
  }
}

// Rows compare as statistics do (byte order for strings), so pruning and filtering agree.
const COMPARE: Record<ComparisonOp, (a: ColumnValue, b: ColumnValue) => boolean> = {
  '=': (a, b) => a === b,
  '!=': (a, b) => a !== b,
  '<': (a, b) => compareValues(a, b) < 0,
  '<=': (a, b) => compareValues(a, b) <= 0,
  '>': (a, b) => compareValues(a, b) > 0,
  '>=': (a, b) => compareValues(a, b) >= 0,
};
