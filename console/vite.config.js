import { defineConfig } from 'vite';
import preact from '@preact/preset-vite';

// Served by flowcap at /ui with every file embedded in the binary
// (flowcap/src/api/ui.rs lists them): fixed names, one script, one
// stylesheet, nothing fetched from elsewhere.
export default defineConfig({
  base: '/ui/',
  plugins: [preact()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    assetsInlineLimit: 0,
    cssCodeSplit: false,
    modulePreload: false,
    rollupOptions: {
      output: {
        entryFileNames: 'assets/console.js',
        chunkFileNames: 'assets/console-[name].js',
        assetFileNames: 'assets/console[extname]',
        inlineDynamicImports: true,
      },
    },
  },
});
