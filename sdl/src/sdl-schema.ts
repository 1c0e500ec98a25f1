// The shape of an Akash SDL 2.0/2.1 document, for validating SDLs we did not write (FLock,
// Ray, hand-edited ones) with messages that name the path. It mirrors chain-sdk's JSON
// schema (dist/sdl-schema.yaml, `validationSDLSchema`) closely enough that whatever passes
// here and in sdl-validation.ts also passes chain-sdk; the cross-check in
// sdl-validation.ts runs chain-sdk's own validator after ours to catch any drift.

import { z } from 'zod';

const stringList = z.array(z.string()).nullable().optional();
const portNumber = z.number().int().min(1).max(65535);
const attributeMap = z.record(z.string(), z.unknown());

const exposeToSchema = z.strictObject({
  global: z.boolean().optional(),
  service: z.string().optional(),
  ip: z.string().min(1).optional(),
});

const exposeSchema = z.strictObject({
  port: portNumber,
  as: portNumber.optional(),
  proto: z.enum(['TCP', 'UDP', 'tcp', 'udp']).optional(),
  to: z.array(exposeToSchema).optional(),
  accept: z.array(z.string()).optional(),
  http_options: z.record(z.string(), z.unknown()).optional(),
});

const serviceSchema = z.strictObject({
  image: z.string().min(1),
  command: stringList,
  args: stringList,
  env: stringList,
  expose: z.array(exposeSchema).optional(),
  dependencies: z.array(z.strictObject({ service: z.string().optional() })).optional(),
  params: z
    .strictObject({
      storage: z
        .record(z.string(), z.strictObject({ mount: z.string().startsWith('/', 'must be an absolute path').optional(), readOnly: z.boolean().optional() }))
        .optional(),
      permissions: z.strictObject({ read: z.array(z.enum(['deployment', 'logs'])).optional() }).optional(),
    })
    .optional(),
  credentials: z
    .strictObject({ host: z.string().min(1), username: z.string().min(1), password: z.string().min(6), email: z.string().min(5).optional() })
    .optional(),
});

const storageVolumeSchema = z.strictObject({
  name: z.string().optional(),
  size: z.string().min(1),
  attributes: z
    .strictObject({
      class: z.string().optional(),
      persistent: z.union([z.boolean(), z.string()]).optional(),
    })
    .optional(),
});

const gpuModelSchema = z.strictObject({
  model: z.string().optional(),
  ram: z.string().optional(),
  interface: z.enum(['pcie', 'sxm']).optional(),
});

const gpuResourceSchema = z.strictObject({
  units: z.union([z.number(), z.string()]),
  attributes: z
    .strictObject({
      vendor: z
        .strictObject({ nvidia: z.array(gpuModelSchema).nullable().optional() })
        .refine((vendor) => Object.keys(vendor).length > 0, 'must name a vendor (nvidia)')
        .optional(),
    })
    .optional(),
});

const computeProfileSchema = z.strictObject({
  resources: z.strictObject({
    cpu: z.strictObject({ units: z.union([z.number(), z.string()]), attributes: attributeMap.optional() }),
    memory: z.strictObject({ size: z.string().min(1) }),
    storage: z.union([storageVolumeSchema, z.array(storageVolumeSchema).min(1)]),
    gpu: gpuResourceSchema.optional(),
  }),
});

const priceSchema = z.strictObject({
  denom: z.string(),
  amount: z.union([z.number().nonnegative(), z.string().regex(/^\d+(\.\d+)?$/, 'must be a non-negative decimal')]),
});

const placementSchema = z.strictObject({
  attributes: attributeMap.optional(),
  signedBy: z.strictObject({ anyOf: z.array(z.string()).optional(), allOf: z.array(z.string()).optional() }).optional(),
  pricing: z.record(z.string(), priceSchema),
});

export const sdlDocumentSchema = z.strictObject({
  version: z.enum(['2.0', '2.1'], { message: 'must be "2.0" or "2.1" (quoted: an unquoted 2.0 is the number 2)' }),
  include: z.array(z.string()).optional(),
  services: z.record(z.string(), serviceSchema),
  profiles: z.strictObject({
    compute: z.record(z.string(), computeProfileSchema),
    placement: z.record(z.string(), placementSchema),
  }),
  deployment: z.record(z.string(), z.record(z.string(), z.strictObject({ profile: z.string(), count: z.number().int() }))),
  endpoints: z.record(z.string(), z.strictObject({ kind: z.literal('ip') })).optional(),
});

export type SdlDocument = z.output<typeof sdlDocumentSchema>;
