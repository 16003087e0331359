#!/usr/bin/env bash
# Deploy mpistyle-watch's storage side (main.json beside this script) into a resource group with
# the Azure CLI, then print the watcher settings to paste into /etc/mpistyle/watch.env.
#
#   deploy/azure/deploy.sh -g GROUP [-l LOCATION] [--create-group] [-n DEPLOYMENT] [--what-if] [NAME=VALUE ...]
#
#   -g, --resource-group GROUP  the resource group to deploy into (required)
#   -l, --location LOCATION     its region (needed with --create-group; also the resources' region,
#                               which is otherwise the group's)
#   --create-group              create the resource group first (az group create)
#   -n, --name DEPLOYMENT       the deployment's name (default mpistyle-storage); deploying again
#                               under any name updates the same resources
#   --what-if                   show what the deployment would change, change nothing
#   NAME=VALUE                  a template parameter (namePrefix=, inputContainer=, queueName=,
#                               allowSharedKeyAccess=true, ...: see main.json's parameters)
#
# Needs az, logged in (az login), and on the group the right to create role assignments (Owner,
# User Access Administrator or Role Based Access Control Administrator) besides Contributor.
# Exit codes: 0 done, 2 usage, otherwise az's own (the message above it says what failed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
template="$here/main.json"
group=""
location=""
create_group=0
deployment="mpistyle-storage"
what_if=0
parameters=()

usage() {  # this header, up to the first line that is not a comment
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

fail_usage() {
  echo "deploy: $1" >&2
  echo "usage: deploy/azure/deploy.sh -g GROUP [-l LOCATION] [--create-group] [-n DEPLOYMENT] [--what-if] [NAME=VALUE ...]" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -g|--resource-group) [ $# -ge 2 ] || fail_usage "$1 needs a value"; group=$2; shift 2 ;;
    -l|--location) [ $# -ge 2 ] || fail_usage "$1 needs a value"; location=$2; shift 2 ;;
    -n|--name) [ $# -ge 2 ] || fail_usage "$1 needs a value"; deployment=$2; shift 2 ;;
    --create-group) create_group=1; shift ;;
    --what-if) what_if=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) fail_usage "unknown option '$1'" ;;
    *=*) parameters+=("$1"); shift ;;
    *) fail_usage "'$1' is neither an option nor a NAME=VALUE template parameter" ;;
  esac
done
[ -n "$group" ] || fail_usage "-g GROUP is required"
[ "$create_group" = 0 ] || [ -n "$location" ] || fail_usage "--create-group needs -l LOCATION"
if [ -n "$location" ]; then
  parameters+=("location=$location")
fi

command -v az >/dev/null || { echo "deploy: the Azure CLI (az) is not installed: https://aka.ms/azure-cli" >&2; exit 127; }
[ -r "$template" ] || { echo "deploy: $template is missing" >&2; exit 2; }
subscription=$(az account show --query name -o tsv) || {
  echo "deploy: az is not logged in: run az login (and az account set -s SUBSCRIPTION)" >&2
  exit 1
}
echo "deploy: subscription '$subscription', resource group '$group'"

# A subscription that never used Event Grid has its provider unregistered, and the system topic
# then fails deep in the deployment: register up front (once per subscription).
for namespace in Microsoft.Storage Microsoft.EventGrid Microsoft.ManagedIdentity; do
  state=$(az provider show -n "$namespace" --query registrationState -o tsv)
  if [ "$state" != "Registered" ]; then
    echo "deploy: registering the resource provider $namespace (state: $state), a minute or two"
    az provider register -n "$namespace" --wait
  fi
done

if [ "$create_group" = 1 ]; then
  az group create -n "$group" -l "$location" -o none
  echo "deploy: resource group '$group' in $location"
fi

args=(-g "$group" -n "$deployment" --template-file "$template")
[ ${#parameters[@]} -eq 0 ] || args+=(--parameters "${parameters[@]}")
if [ "$what_if" = 1 ]; then
  exec az deployment group what-if "${args[@]}"
fi
echo "deploy: deploying $template as '$deployment' (a few minutes)"
if ! az deployment group create "${args[@]}" -o none; then
  echo "deploy: the deployment failed; its operations: az deployment operation group list -g $group -n $deployment -o table" >&2
  exit 1
fi

output() {
  az deployment group show -g "$group" -n "$deployment" --query "properties.outputs.$1.value" -o tsv
}
read -r -a overrides <<<"$(output watcherOverrides)"
identity_id=$(output identityResourceId)
client_id=$(output identityClientId)
dead_letters=$(output deadLetterContainerUrl)

cat <<EOF

deploy: done. The watcher's storage settings (Hydra overrides: add them to MPISTYLE_WATCH_ARGS in
/etc/mpistyle/watch.env, beside the runner's; the queue keys follow the watcher's docs):
EOF
printf '  %s\n' "${overrides[@]}"
cat <<EOF

The watcher authenticates as the managed identity: leave MPISTYLE_INPUT_CREDENTIAL,
MPISTYLE_OUTPUT_CREDENTIAL and MPISTYLE_WORK_CREDENTIAL unset, install azure-identity in the
watcher's environment, and add to watch.env the line
  AZURE_CLIENT_ID=$client_id
Attach the identity to the watcher's host (the CycleCloud scheduler VM, say):
  az vm identity assign -g CLUSTER_GROUP -n SCHEDULER_VM --identities $identity_id
Events Event Grid could not deliver land in $dead_letters
EOF
