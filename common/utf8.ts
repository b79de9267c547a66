/**
 * UTF-8 for code that runs where there is no TextEncoder (the guest agent
 * runs on QuickJS, which has none). Uses the runtime's codec when it has
 * one (Node: native speed), else a small JS one; both give the same bytes
 * for well-formed strings, and both decode malformed input to U+FFFD.
 */
type Codec = { encode(s: string): Uint8Array; decode(b: Uint8Array): string };

const native: Codec | undefined =
  typeof (globalThis as { TextEncoder?: unknown }).TextEncoder === 'function'
    ? (() => {
        const e = new TextEncoder();
        const d = new TextDecoder();
        return { encode: (s: string) => e.encode(s), decode: (b: Uint8Array) => d.decode(b) };
      })()
    : undefined;

export function utf8Encode(s: string): Uint8Array {
  return native ? native.encode(s) : encodeJs(s);
}

export function utf8Decode(b: Uint8Array): string {
  return native ? native.decode(b) : decodeJs(b);
}

/** The JS encoder (exported for tests that compare it with the native one). */
export function encodeJs(s: string): Uint8Array {
  const out = new Uint8Array(s.length * 3);
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c < 0x80) {
      out[n++] = c;
      continue;
    }
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
      }
    }
    if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd; // a lone surrogate, as TextEncoder does
    if (c < 0x800) {
      out[n++] = 0xc0 | (c >> 6);
      out[n++] = 0x80 | (c & 63);
    } else if (c < 0x10000) {
      out[n++] = 0xe0 | (c >> 12);
      out[n++] = 0x80 | ((c >> 6) & 63);
      out[n++] = 0x80 | (c & 63);
    } else {
      out[n++] = 0xf0 | (c >> 18);
      out[n++] = 0x80 | ((c >> 12) & 63);
      out[n++] = 0x80 | ((c >> 6) & 63);
      out[n++] = 0x80 | (c & 63);
    }
  }
  return out.subarray(0, n);
}

/**
 * The JS decoder. Its common case runs in the engine's native code: the bytes
 * as Latin-1 (String.fromCharCode over slices), which is the answer when none
 * is 0x80 or above (a regex tells), else escape + decodeURIComponent, which
 * decode well-formed UTF-8 and throw on anything else; only then does the
 * byte-by-byte decoder run. Under TCG every JS loop iteration is dear:
 * measured in a pod VM, a 6 KB agent request took 24 ms through the
 * byte loops (framing and decoding), ~3.5 ms a KB.
 */
export function decodeJs(b: Uint8Array): string {
  const parts: string[] = [];
  for (let i = 0; i < b.length; i += 8192) parts.push(String.fromCharCode.apply(null, b.subarray(i, i + 8192) as unknown as number[]));
  const latin1 = parts.join('');
  if (!/[\x80-\xff]/.test(latin1)) return latin1;
  try {
    return decodeURIComponent(escape(latin1));
  } catch {
    return decodeBytewise(b);
  } // malformed: U+FFFD where TextDecoder puts it
}

/** The byte-by-byte decoder: ASCII runs in chunks, multi-byte sequences checked (overlong, surrogates, range) like TextDecoder. */
export function decodeBytewise(b: Uint8Array): string {
  const parts: string[] = [];
  const units: number[] = [];
  const flush = () => {
    if (units.length) {
      parts.push(String.fromCharCode.apply(null, units));
      units.length = 0;
    }
  };
  for (let i = 0; i < b.length; ) {
    const c = b[i];
    if (c < 0x80) {
      units.push(c);
      i++;
      if (units.length >= 4096) flush();
      continue;
    }
    const need = c >= 0xf0 && c <= 0xf4 ? 3 : c >= 0xe0 ? (c <= 0xef ? 2 : 0) : c >= 0xc2 && c <= 0xdf ? 1 : 0;
    let cp = need === 3 ? c & 7 : need === 2 ? c & 15 : c & 31;
    let k = 1;
    for (; k <= need && i + k < b.length; k++) {
      const x = b[i + k];
      const lo = k === 1 ? (c === 0xe0 ? 0xa0 : c === 0xf0 ? 0x90 : 0x80) : 0x80;
      const hi = k === 1 ? (c === 0xed ? 0x9f : c === 0xf4 ? 0x8f : 0xbf) : 0xbf;
      if (x < lo || x > hi) break;
      cp = (cp << 6) | (x & 63);
    }
    if (need === 0 || k <= need) {
      units.push(0xfffd);
      i += Math.max(1, k);
      continue;
    }
    i += need + 1;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      units.push(0xd800 + (cp >> 10), 0xdc00 + (cp & 1023));
    } else units.push(cp);
    if (units.length >= 4096) flush();
  }
  flush();
  return parts.join('');
}
