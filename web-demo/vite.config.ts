import { defineConfig } from "vite";

// The built page is committed and served by the backend at `/` (no CDN, works offline).
export default defineConfig({
  base: "/",
  build: { outDir: "../backend/web/static", emptyOutDir: true, sourcemap: false },
});
