{{- define "chorus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chorus.labels" -}}
app.kubernetes.io/name: chorus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "chorus.selector" -}}
app.kubernetes.io/name: chorus
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The label selector the coordinator's discovery uses to find this release's workers. */}}
{{- define "chorus.workerSelector" -}}
app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=worker
{{- end -}}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chorus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the worker's --model gets: a path inside the mounted volume, or the hub id. */}}
{{- define "chorus.modelPath" -}}
{{- $s := .source -}}
{{- if $s.hub -}}{{ $s.hub.id }}
{{- else if $s.pvc -}}{{ printf "/models/%s" (default "" $s.pvc.subPath) | trimSuffix "/" }}
{{- else -}}/models
{{- end -}}
{{- end -}}

{{- define "chorus.drainSeconds" -}}
{{- sub .Values.terminationGracePeriodSeconds 10 -}}
{{- end -}}

{{- define "chorus.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Where the Secrets are mounted (read-only); the rendered config points at these paths. */}}
{{- define "chorus.clientsTlsDir" -}}/etc/chorus-tls/clients{{- end -}}
{{- define "chorus.workersTlsDir" -}}/etc/chorus-tls/workers{{- end -}}
{{- define "chorus.authDir" -}}/etc/chorus-auth{{- end -}}

{{- define "chorus.workerServerName" -}}
{{- default (printf "%s-worker" (include "chorus.fullname" .)) .Values.tls.workers.serverName -}}
{{- end -}}

{{/* The coordinator's client certificate towards TLS workers. */}}
{{- define "chorus.workersClientSecret" -}}
{{- default .Values.tls.workers.secretName .Values.tls.workers.clientSecretName -}}
{{- end -}}

{{- define "chorus.secretVolume" -}}
secret:
  secretName: {{ . }}
  defaultMode: 0440
{{- end -}}

{{/*
A probe's handler. Without TLS: kubelet's native gRPC probe. With TLS (which kubelet's gRPC probes
cannot speak): exec a Python gRPC health check against 127.0.0.1 that trusts dir/ca.crt, presents
dir/tls.crt (for servers requiring client certificates) and checks serverName.
Argument: dict "port" "service" "tls" "dir" "serverName".
*/}}
{{- define "chorus.probeHandler" -}}
{{- if .tls }}
exec:
  command:
    - python
    - -c
    - >-
      import sys, grpc;
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
      port, service, d, name = sys.argv[1:];
      r = lambda f: open(d + "/" + f, "rb").read();
      c = grpc.ssl_channel_credentials(r("ca.crt"), r("tls.key"), r("tls.crt"));
      ch = grpc.secure_channel("127.0.0.1:" + port, c, options=[("grpc.ssl_target_name_override", name)]);
      s = g.HealthStub(ch).Check(h.HealthCheckRequest(service=service), timeout=4).status;
      sys.exit(s != h.HealthCheckResponse.SERVING)
    - {{ .port | quote }}
    - {{ .service | quote }}
    - {{ .dir }}
    - {{ .serverName }}
timeoutSeconds: 5
{{- else }}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "chorus.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A model's worker Deployment name (also its PDB, HPA and ScaledObject). Argument: dict "root" "model". */}}
{{- define "chorus.workerName" -}}
{{- printf "%s-%s" (include "chorus.fullname" .root) .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
A per-model value: the model's own when it sets the key (even to ""), else worker.<key>.
Argument: dict "root" "model" "key"; the result is JSON {"v": value}: (include ... | fromJson).v
*/}}
{{- define "chorus.modelOrWorker" -}}
{{- dict "v" (ternary (get .model .key) (get .root.Values.worker .key) (hasKey .model .key)) | toJson -}}
{{- end -}}

{{/*
A model's Deployment strategy (YAML): models[i].strategy, else worker.strategy; a RollingUpdate
defaults to maxSurge 0 / maxUnavailable 1 (one pod down at a time, never a spare GPU).
Argument: dict "root" "model".
*/}}
{{- define "chorus.workerStrategy" -}}
{{- $where := ternary (printf "models[%s].strategy" .model.name) "worker.strategy" (hasKey .model "strategy") -}}
{{- $s := (include "chorus.modelOrWorker" (merge (dict "key" "strategy") .) | fromJson).v -}}
type: {{ $s.type }}
{{- if eq $s.type "RollingUpdate" }}
{{- $ru := default dict $s.rollingUpdate }}
{{- $surge := ternary $ru.maxSurge 0 (hasKey $ru "maxSurge") }}
{{- $unavailable := ternary $ru.maxUnavailable 1 (hasKey $ru "maxUnavailable") }}
{{- if and (has (toString $surge) (list "0" "0%")) (has (toString $unavailable) (list "0" "0%")) }}
{{- fail (printf "%s: maxSurge and maxUnavailable cannot both be 0 (the rollout could never proceed)" $where) }}
{{- end }}
rollingUpdate:
  maxSurge: {{ $surge | toJson }}
  maxUnavailable: {{ $unavailable | toJson }}
{{- else if $s.rollingUpdate }}
{{- fail (printf "%s: rollingUpdate is only for type RollingUpdate (type is %s)" $where $s.type) }}
{{- end }}
{{- end -}}

{{/*
A model's weights cache (YAML: worker.weightsCache with models[i].weightsCache's keys over it, plus
claimName). Only hub models download weights, so only they get one; pvc and hostPath weights are
read in place. Argument: dict "root" "model".
*/}}
{{- define "chorus.weightsCache" -}}
{{- $c := deepCopy .root.Values.worker.weightsCache -}}
{{- $own := default dict .model.weightsCache -}}
{{- range $k, $v := $own }}{{ $_ := set $c $k $v }}{{ end -}}
{{- if and $own.enabled (not .model.source.hub) -}}
{{- fail (printf "models[%s].weightsCache.enabled: only a hub source downloads weights; pvc and hostPath weights are read in place" .model.name) -}}
{{- end -}}
{{- $_ := set $c "enabled" (and $c.enabled (hasKey .model.source "hub")) -}}
{{- $claim := $c.existingClaim -}}
{{- if not $claim -}}
{{- $claim = printf "%s-weights" (include "chorus.workerName" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}
{{- $_ := set $c "claimName" $claim -}}
{{- toYaml $c -}}
{{- end -}}

{{/* Fails when an extra volume takes a name the chart uses. Argument: dict "volumes" "reserved" "where". */}}
{{- define "chorus.checkVolumeNames" -}}
{{- range .volumes -}}
{{- if has .name $.reserved -}}
{{- fail (printf "%s: the volume name %q is the chart's own (%s are taken)" $.where .name (join ", " $.reserved)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
