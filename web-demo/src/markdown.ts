// A small Markdown renderer for answers that builds DOM nodes only (createElement and text
// nodes, never innerHTML): whatever HTML a model writes is shown as text, so it cannot run.
// Covers what chat answers use: paragraphs, line breaks, headings, lists, quotes, fenced and
// inline code, bold, italic and links (http, https and mailto only).
import { h } from "./dom";

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
// Inline: `code`, **bold**, __bold__, *italic*, _italic_, [text](url)
const INLINE =
  /`([^`\n]+)`|\*\*(?=\S)([^]*?\S)\*\*|__(?=\S)([^]*?\S)__|(?<![\w*])\*(?=\S)([^*\n]*?\S)\*(?![\w*])|(?<![\w_])_(?=\S)([^_\n]*?\S)_(?![\w_])|\[([^\]\n]+)\]\(([^)\s]+)\)/g;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

export function renderMarkdown(text: string): DocumentFragment {
  const out = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const body: string[] = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence (absent while an answer is still streaming)
      const code = h("code", fence[2] ? { class: `language-${fence[2]}` } : {}, body.join("\n"));
      out.append(h("pre", {}, code));
      continue;
    }
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const level = Math.min(6, heading[1].length + 2); // answers sit under the page's h2
      const el = document.createElement(`h${level}`);
      el.append(...inline(heading[2]));
      out.append(el);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      out.append(h("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const body: string[] = [];
      while (i < lines.length && QUOTE.test(lines[i])) body.push(QUOTE.exec(lines[i++])![1]);
      const quote = h("blockquote");
      quote.append(renderMarkdown(body.join("\n")));
      out.append(quote);
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = !BULLET.test(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const list = numbered ? h("ol") : h("ul");
      const start = numbered ? Number(NUMBERED.exec(line)![1]) : 1;
      if (numbered && start !== 1) list.setAttribute("start", String(start));
      while (i < lines.length && pattern.test(lines[i])) {
        const match = pattern.exec(lines[i++])!;
        const item = h("li");
        item.append(...inline(match[numbered ? 2 : 1]));
        list.append(item);
      }
      out.append(list);
      continue;
    }
    const paragraph: string[] = [];
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) paragraph.push(lines[i++]);
    const p = h("p");
    paragraph.forEach((part, n) => {
      if (n) p.append(h("br"));
      p.append(...inline(part));
    });
    out.append(p);
  }
  return out;
}

function startsBlock(line: string): boolean {
  return [FENCE, HEADING, BULLET, NUMBERED, QUOTE, RULE].some((re) => re.test(line));
}

/** Inline Markdown of one line, as nodes. */
function inline(text: string): Node[] {
  const nodes: Node[] = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    const at = m.index ?? 0;
    if (at > last) nodes.push(document.createTextNode(text.slice(last, at)));
    last = at + m[0].length;
    if (m[1] !== undefined) nodes.push(h("code", {}, m[1]));
    else if (m[2] !== undefined || m[3] !== undefined) nodes.push(wrap("strong", m[2] ?? m[3]));
    else if (m[4] !== undefined || m[5] !== undefined) nodes.push(wrap("em", m[4] ?? m[5]));
    else if (SAFE_URL.test(m[7])) {
      const link = h("a", { href: m[7], target: "_blank", rel: "noopener noreferrer nofollow" });
      link.append(...inline(m[6]));
      nodes.push(link);
    } else nodes.push(document.createTextNode(m[0])); // javascript:, data:... stay text
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function wrap(tag: "strong" | "em", text: string): HTMLElement {
  const el = h(tag);
  el.append(...inline(text));
  return el;
}
