// Images: analyse an upload (OCR, detection, classification), each result as it arrives, boxes
// drawn over the image.
import { call, follow } from "./api";
import { h, status } from "./dom";

const EVENTS = `subscription($id: ID!, $after: String) { visionJobEvents(id: $id, after: $after) {
  __typename cursor
  ... on VisionTaskCompleted { task model version ms result }
  ... on VisionTaskFailed { task code message }
  ... on VisionJobFailed { code message } } }`;

type Box = { x: number; y: number; width: number; height: number };

export function drawBoxes(canvas: HTMLCanvasElement, width: number, height: number, boxes: { label: string; box: Box }[]) {
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext("2d");
  if (!g) return;
  g.clearRect(0, 0, width, height);
  g.lineWidth = Math.max(2, width / 200);
  g.strokeStyle = "#ffd400";
  g.fillStyle = "#ffd400";
  g.font = `${Math.max(12, width / 40)}px sans-serif`;
  for (const { label, box } of boxes) {
    g.strokeRect(box.x, box.y, box.width, box.height);
    g.fillText(label, box.x + 4, Math.max(14, box.y - 4));
  }
}

export function imagesPage(root: HTMLElement) {
  const file = h("input", { id: "image", type: "file", accept: "image/*", required: true });
  const checks = ["OCR", "DETECT", "CLASSIFY"].map((task) =>
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "task", value: task, checked: true }), ` ${task.toLowerCase()}`));
  const note = h("p", { class: "status", role: "status" });
  const picture = h("img", { alt: "The analysed image", class: "picture" });
  const overlay = h("canvas", { class: "overlay", "aria-hidden": "true" });
  const text = h("pre", { class: "ocr", "aria-label": "Text read from the image" });
  const classes = h("ol", { class: "classes", "aria-label": "Classes" });
  const objects = h("p", { class: "objects" });
  // each task's model and version, as the result names them (a canary shows as its version)
  const versions = h("ul", { class: "versions", "aria-label": "Model versions" });
  const form = h("form", { "aria-label": "Analyse an image" },
    h("label", { for: "image" }, "Image"), file,
    h("fieldset", {}, h("legend", {}, "Tasks"), ...checks),
    h("button", { type: "submit" }, "Analyse"), note);
  root.replaceChildren(h("section", {}, h("h2", {}, "Images"), form,
    h("div", { class: "stage" }, picture, overlay),
    versions,
    h("h3", {}, "Text"), text, h("h3", {}, "Objects"), objects, h("h3", {}, "Classes"), classes));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = file.files?.[0];
    if (!chosen) return;
    const tasks = [...form.querySelectorAll<HTMLInputElement>("input[name=task]:checked")].map((i) => i.value);
    picture.src = URL.createObjectURL(chosen);
    text.textContent = "";
    classes.replaceChildren();
    objects.textContent = "";
    versions.replaceChildren();
    drawBoxes(overlay, 1, 1, []);
    status(note, "Uploading…", "busy");
    try {
      const data = await call(
        `mutation($i: Upload!, $t: [VisionTask!]!) { analyzeImage(image: $i, tasks: $t) { id width height } }`,
        { i: chosen, t: tasks },
      );
      const job = data.analyzeImage;
      status(note, "Analysing…", "busy");
      follow<{ visionJobEvents: any }>(EVENTS, { id: job.id }, ({ visionJobEvents: e }) => {
        if (e.__typename === "VisionTaskCompleted") {
          versions.append(h("li", { "data-task": e.task }, `${e.task}: ${e.model}@${e.version}`));
          if (e.task === "ocr") text.textContent = e.result.text || "(no text found)";
          if (e.task === "classify")
            classes.replaceChildren(...e.result.classes.map((c: any) => h("li", {}, `${c.label} ${(c.score * 100).toFixed(1)}%`)));
          if (e.task === "detect") {
            objects.textContent = `${e.result.objects.length} found (${e.model})`;
            drawBoxes(overlay, job.width, job.height, e.result.objects);
          }
        } else if (e.__typename === "VisionTaskFailed" || e.__typename === "VisionJobFailed") {
          status(note, `${e.task ?? "job"}: ${e.code} ${e.message}`, "error");
        }
      }, (error) => status(note, error ?? "Done.", error ? "error" : "info"),
      // a dropped socket or an expired token resumes after the last result seen
      { cursor: ({ visionJobEvents: e }) => e.cursor });
    } catch (e) {
      status(note, (e as Error).message, "error");
    }
  });
}
