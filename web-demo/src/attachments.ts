// Images attached to a chat message: each is analysed at once (analyzeImage: text, objects,
// classes) and sent as its vision job's id (sendMessage(attachments:)); the answer looks at
// what the analysis found.
import { call, follow } from "./api";
import { h } from "./dom";

const JOB = `subscription($id: ID!) { visionJobEvents(id: $id) {
  __typename
  ... on VisionJobFailed { code message } } }`;

type Attachment = { name: string; url: string; ready: Promise<string>; chip: HTMLElement };

// Small copies of the pictures sent from this tab, by vision job id, to show them again in
// the history (the server keeps what the analysis found, not the image).
const PICTURE = "sightline.picture.";
const THUMBNAIL_PX = 160;

export function pictureOf(jobId: string): string | undefined {
  return sessionStorage.getItem(PICTURE + jobId) ?? undefined;
}

async function keepThumbnail(jobId: string, file: File): Promise<void> {
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, THUMBNAIL_PX / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d")?.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    sessionStorage.setItem(PICTURE + jobId, canvas.toDataURL("image/jpeg", 0.8));
  } catch {
    // not decodable here, or storage full: the history shows a placeholder instead
  }
}

export function attachmentPicker(onError: (message: string) => void) {
  const input = h("input", {
    id: "attach",
    type: "file",
    accept: "image/png,image/jpeg,image/webp,image/tiff,image/bmp,image/gif",
    multiple: true,
    class: "visually-hidden",
    "aria-label": "Attach images",
  });
  const chips = h("ul", { class: "attachments", "aria-label": "Attached images" });
  const button = h("button", { type: "button", class: "secondary", onclick: () => input.click() }, "Attach image");
  let attached: Attachment[] = [];

  function add(file: File) {
    const url = URL.createObjectURL(file);
    const state = h("span", { class: "state" }, "analysing…");
    const remove = h("button", { type: "button", class: "icon", "aria-label": `Remove ${file.name}` }, "✕");
    const chip = h("li", {}, h("img", { src: url, alt: file.name }), h("span", {}, file.name), state, remove);
    const ready = analyse(file).then(
      (id) => {
        state.textContent = "ready";
        void keepThumbnail(id, file);
        return id;
      },
      (e: Error) => {
        state.textContent = "failed";
        chip.dataset.kind = "error";
        onError(`${file.name}: ${e.message}`);
        throw e;
      },
    );
    ready.catch(() => undefined); // reported above; the send waits on it again
    const attachment = { name: file.name, url, ready, chip };
    remove.addEventListener("click", () => {
      attached = attached.filter((a) => a !== attachment);
      chip.remove();
    });
    attached.push(attachment);
    chips.append(chip);
  }

  input.addEventListener("change", () => {
    for (const file of input.files ?? []) add(file);
    input.value = "";
  });

  return {
    input,
    button,
    chips,
    /** What is attached now: the pictures, and their job ids once all are analysed. */
    take(): { urls: string[]; ids: Promise<string[]> } | null {
      if (!attached.length) return null;
      const taken = attached;
      return { urls: taken.map((a) => a.url), ids: Promise.all(taken.map((a) => a.ready)) };
    },
    clear() {
      attached = [];
      chips.replaceChildren();
    },
  };
}

async function analyse(file: File): Promise<string> {
  const data = await call(
    `mutation($i: Upload!) { analyzeImage(image: $i, tasks: [OCR, DETECT, CLASSIFY]) { id } }`,
    { i: file },
  );
  const id: string = data.analyzeImage.id;
  await new Promise<void>((resolve, reject) => {
    follow<{ visionJobEvents: any }>(JOB, { id }, ({ visionJobEvents: e }) => {
      if (e.__typename === "VisionJobFailed") reject(new Error(`${e.code}: ${e.message}`));
    }, (error) => (error ? reject(new Error(error)) : resolve()));
  });
  return id;
}
