/**
 * What builder, guest agent and host agree on, defined once: the agent's
 * virtio-serial port, and the part of
 * manifest.json the builder writes and the host reads.
 */

/** The virtio-serial port name the agent opens (/dev/virtio-ports/<name>) and QEMU creates. */
export const AGENT_PORT_NAME = 'org.scion.agent.0';

/**
 * The part of a built image's manifest.json that the host reads (the builder
 * writes more: packages, outputs, hashes). host/image.ts validates it.
 */
export interface ManifestForHost {
  manifestVersion: 1;
  name: string;
  kernel: { cmdline: string };
  guestRamMB: number;
  /** guest ports the image's containers serve (forwarded per clone in user-mode networking) */
  ports: number[];
}
