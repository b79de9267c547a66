/** The parts of QuickJS's `std` and `os` modules the agent uses (https://bellard.org/quickjs/quickjs.html#std-module). */
declare module 'os' {
  export const O_RDONLY: number, O_WRONLY: number, O_RDWR: number, O_CREAT: number, O_TRUNC: number, O_APPEND: number, O_EXCL: number;
  export const SIGCHLD: number, SIGTERM: number, SIGKILL: number, SIGPIPE: number, WNOHANG: number;
  export const S_IFMT: number, S_IFREG: number, S_IFDIR: number;
  /** a file descriptor, or a negative errno */
  export function open(path: string, flags: number, mode?: number): number;
  export function close(fd: number): number;
  export function read(fd: number, buf: ArrayBuffer, offset: number, length: number): number;
  export function write(fd: number, buf: ArrayBuffer, offset: number, length: number): number;
  export function seek(fd: number, offset: number, whence: number): number;
  export function pipe(): [number, number] | null;
  export function exec(
    argv: string[],
    opts?: { block?: boolean; usePath?: boolean; file?: string; cwd?: string; stdin?: number; stdout?: number; stderr?: number; env?: Record<string, string> },
  ): number;
  export function waitpid(pid: number, options: number): [number, number];
  export function kill(pid: number, sig: number): number;
  export function signal(sig: number, handler: (() => void) | null): void;
  export function setReadHandler(fd: number, cb: (() => void) | null): void;
  export function setWriteHandler(fd: number, cb: (() => void) | null): void;
  export function setTimeout(cb: () => void, ms: number): unknown;
  export function clearTimeout(t: unknown): void;
  export function mkdir(path: string, mode?: number): number;
  export function readdir(path: string): [string[], number];
  export function readlink(path: string): [string, number];
  export function stat(path: string): [{ mode: number; size: number }, number];
  export function remove(path: string): number;
  export function rename(from: string, to: string): number;
  export function symlink(target: string, linkpath: string): number;
}
declare module 'std' {
  export const SEEK_SET: number, SEEK_END: number;
  export function getenv(name: string): string | undefined;
  export function exit(code: number): never;
  export function strerror(errno: number): string;
  export function loadFile(path: string): string | null;
  export const err: { puts(s: string): void; flush(): void };
}
declare const scriptArgs: string[];
