// Validates Kubernetes custom resources against their published schemas (the @kubernetes-models packages):
// reads a JSON array of objects on stdin, prints one JSON line per object {kind, name, error}, exits 1 if any
// is invalid or of a kind it has no schema for.
import { readFileSync } from "node:fs";

const MODELS = {
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "gateway.networking.k8s.io/v1": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1",
  "karpenter.sh/v1": "@kubernetes-models/karpenter/karpenter.sh/v1",
  "karpenter.k8s.aws/v1": "@kubernetes-models/karpenter/karpenter.k8s.aws/v1",
};

let failed = false;
for (const object of JSON.parse(readFileSync(0, "utf8"))) {
  const result = { kind: object.kind, name: object.metadata?.name, error: null };
  const module = MODELS[object.apiVersion];
  const Model = module && (await import(module))[object.kind];
  if (!Model) {
    result.error = `no schema for ${object.apiVersion} ${object.kind}`;
  } else {
    try {
      new Model(object).validate();
    } catch (error) {
      result.error = error.message;
    }
  }
  failed ||= result.error !== null;
  console.log(JSON.stringify(result));
}
process.exit(failed ? 1 : 0);
