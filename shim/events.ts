/**
 * Task events back to containerd: each one an Envelope (timestamp,
 * namespace, topic, the event as an Any) forwarded over ttrpc to
 * TTRPC_ADDRESS (containerd.services.events.ttrpc.v1.Events/Forward), in the
 * order they were made, one at a time, retried briefly while containerd is
 * away (it restarts; the shim goes on).
 */
import { TtrpcClient } from './ttrpc.ts';
import { any, timestamp, type Msg } from './proto.ts';

/** Topic -> the event's message type (containerd's api/events/task.proto). */
export const TASK_EVENTS = {
  '/tasks/create': 'containerd.events.TaskCreate',
  '/tasks/start': 'containerd.events.TaskStart',
  '/tasks/exit': 'containerd.events.TaskExit',
  '/tasks/delete': 'containerd.events.TaskDelete',
  '/tasks/exec-added': 'containerd.events.TaskExecAdded',
  '/tasks/exec-started': 'containerd.events.TaskExecStarted',
  '/tasks/oom': 'containerd.events.TaskOOM',
} as const;
export type TaskTopic = keyof typeof TASK_EVENTS;

/** The Forward request for one event. Pure but for the clock passed in. */
export function envelope(namespace: string, topic: TaskTopic, event: Msg, nowMs: number): Msg {
  const type = TASK_EVENTS[topic];
  // containerd's typeurl names events by their full protobuf name, without a URL prefix
  return { envelope: { timestamp: timestamp(nowMs), namespace, topic, event: any(type, event) } };
}

export class EventPublisher {
  private readonly client: TtrpcClient;
  private chain: Promise<void> = Promise.resolve();
  /** the last failure to deliver an event (after its retries), for the shim's log */
  onDropped: (topic: string, e: Error) => void = () => {};

  constructor(
    readonly ttrpcAddress: string,
    readonly namespace: string,
    readonly retries = 5,
  ) {
    this.client = new TtrpcClient(ttrpcAddress);
  }

  /** Queue an event; resolves when it was delivered (or given up on). */
  publish(topic: TaskTopic, event: Msg): Promise<void> {
    const req = envelope(this.namespace, topic, event, Date.now());
    this.chain = this.chain.then(async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          await this.client.call('containerd.services.events.ttrpc.v1.Events', 'Forward', req);
          return;
        } catch (e) {
          if (attempt >= this.retries) {
            this.onDropped(topic, e as Error);
            return;
          }
          await new Promise((r) => setTimeout(r, 100 * 2 ** attempt));
        }
      }
    });
    return this.chain;
  }

  close(): void {
    this.client.close();
  }
}
